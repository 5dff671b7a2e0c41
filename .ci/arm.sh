#!/usr/bin/env bash
# .ci/arm.sh: the emulated aarch64 job (issue 7). Called by .ci/run after the README's test command;
# needs root (qemu user-mode through binfmt_misc and a chroot, see ../shared/arm/run-aarch64.sh).
#
# For each core in ARM_CORES (default: cortex-a53 = Pi 3, no dot-product; cortex-a76 = Pi 5, sdot):
#   1. .ci/arm_int8_dump.py: every portable int8 kernel row of the kernel table on fixed inputs,
#      checked against its numpy reference, outputs saved to build/arm/int8-<core>.npz;
#   2. pytest -m arm: the kernel and runtime tests marked `arm` (plus ARM_TESTS if given).
# Then the int8 outputs of all cores must be bit-identical (issue 7, Done when).
#
# Install: the project is built into a wheel on the host (pure Python) and unpacked with the
# host's pip --target into build/arm/site, which is on PYTHONPATH inside the arm64 root (the
# project is mounted at /work there). The job thus tests the packaged sparsedge as a board
# would run it; the aarch64 dependencies are the runner's PY_REQS wheels.
#
# Numba caches: one directory per core (/tmp/numba-cache/<core> inside the arm64 root). numba
# keys cache entries by (LLVM triple, CPU name, CPU features), so a shared directory would still
# never hand one board's code to another (tests/test_threads_cache.py), but two targets saving
# into one index at once can drop each other's entries; per-core directories avoid that.
# The arm64 root (and its caches) persists in ARM_DIR between runs; ARM_COLD=1 empties the
# numba caches first (what a fresh CI machine sees).
#
# knobs: ARM_CORES ("cortex-a53 cortex-a76"), ARM_MARK ("arm"; "" = no marker filter),
#        ARM_TESTS (pytest paths/args, default "tests"), ARM_COLD=1, PYTHON (host python with pip,
#        default .venv/bin/python), and the runner's knobs (ARM_DIR, PY_REQS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ARM_CORES=${ARM_CORES:-"cortex-a53 cortex-a76"}
ARM_MARK=${ARM_MARK-arm}
ARM_TESTS=${ARM_TESTS:-tests}
PY=${PYTHON:-.venv/bin/python}
RUNNER=../shared/arm/run-aarch64.sh
OUT=build/arm
t0=$SECONDS
say() { echo "=== [arm +$((SECONDS - t0))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "arm.sh: run as root (qemu binfmt + chroot)" >&2; exit 1; }
[ -f "$RUNNER" ] || { echo "arm.sh: $RUNNER not found (../shared beside the project root)" >&2; exit 1; }

say "wheel + pip --target $OUT/site"
rm -rf "$OUT/wheel" "$OUT/site" "$OUT"/int8-*.npz
mkdir -p "$OUT"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheel" . 2>&1 | grep -v -i "warn\|^ \|^$\|\*\*\*\|!!" || true
"$PY" -m pip install -q --no-deps --no-compile --target "$OUT/site" "$OUT"/wheel/sparsedge-*.whl
[ -f "$OUT/site/sparsedge/runtime/capi/sparsedge.h" ] || echo "arm.sh: note: the wheel lacks runtime/capi files" >&2

mark_args=()
[ -n "$ARM_MARK" ] && mark_args=(-m "$ARM_MARK")
for core in $ARM_CORES; do
  say "$core: int8 kernel outputs, then pytest ${mark_args[*]} $ARM_TESTS"
  start=$SECONDS
  # shellcheck disable=SC2016
  QEMU_CPU=$core PYTHONPATH=/work/$OUT/site bash "$RUNNER" bash -c '
    set -e
    export NUMBA_CACHE_DIR=/tmp/numba-cache/$QEMU_CPU
    if [ "$1" = 1 ]; then rm -rf "$NUMBA_CACHE_DIR"; fi
    shift
    python3 -c "import platform, sparsedge; assert platform.machine() == \"aarch64\"; print(\"sparsedge from\", sparsedge.__file__)"
    python3 .ci/arm_int8_dump.py "build/arm/int8-$QEMU_CPU.npz"
    rc=0
    python3 -m pytest -q -p no:cacheprovider "$@" || rc=$?
    if [ $rc = 5 ]; then echo "arm.sh: no test selected (mark tests with @pytest.mark.arm)" >&2; fi
    exit $rc
  ' bash "${ARM_COLD:-0}" "${mark_args[@]}" $ARM_TESTS
  say "$core: passed in $((SECONDS - start)) s"
done

say "int8 outputs bit-identical across: $ARM_CORES"
files=()
for core in $ARM_CORES; do files+=("$OUT/int8-$core.npz"); done
"$PY" - "${files[@]}" <<'EOF'
import sys
import numpy as np
first = np.load(sys.argv[1])
bad = []
for other in sys.argv[2:]:
    o = np.load(other)
    if set(o.files) != set(first.files):
        bad.append(f"{other}: rows {sorted(set(o.files) ^ set(first.files))} differ")
    for k in sorted(set(o.files) & set(first.files)):
        a, b = first[k], o[k]
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            bad.append(f"{k}: {sys.argv[1]} vs {other}: "
                       f"{int(np.sum(a.view(np.uint32) != b.view(np.uint32))) if a.shape == b.shape else 'shape'} "
                       f"elements differ")
print(f"{len(first.files)} int8 rows compared across {len(sys.argv) - 1} cores")
if bad:
    print("int8 results differ between cores:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
say "arm job passed"
