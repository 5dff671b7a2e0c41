#!/usr/bin/env bash
# .ci/arm.sh: the emulated aarch64 job (issue 7). Called by .ci/run after the README's test command;
# needs root (qemu user-mode through binfmt_misc and a chroot, see ../shared/arm/run-aarch64.sh).
#
# For each core in ARM_CORES (default: cortex-a53 = Pi 3, no dot-product; cortex-a76 = Pi 5, sdot):
#   1. .ci/arm_check.py: every float32 and portable int8 kernel row of the kernel table called
#      once (odd shapes, full epilogue) against its numpy reference; on aarch64, sdot present in
#      the compiled int8 code iff the core has dotprod; a Session end to end (csr + int8 MLP vs the
#      reference interpreter, 3 threads x 20 runs); int8 outputs saved to build/arm/int8-<core>.npz;
#   2. pytest on ARM_FILES with -k "$ARM_K": a few unit tests (edge shapes of one sparse kernel,
#      the exact-integer int8 check, the runtime's 4-thread concurrency test). numba compiles
#      under emulation cost 30-60 s of CPU each, so keep this selection small.
# Then the int8 outputs of all cores must be bit-identical (issue 7, Done when).
#
# Install: the project is built into a wheel on the host (pure Python) and unpacked with the
# host's pip --target into build/arm/site, which is on PYTHONPATH inside the arm64 root (the
# project is mounted at /work there). The job thus tests the packaged sparsedge as a board
# would run it; the aarch64 dependencies are the runner's PY_REQS wheels.
#
# Cores run in parallel (ARM_PARALLEL=1, the default on >= 2 CPUs; qemu user-mode runs numba's
# compiler on one host thread), each in its own arm64 root (ARM_DIR/<core>; the second root is
# copied from the first). Only the binfmt registration is shared, and it is re-written only when
# a runner starts, so the second core starts after the first is running.
#
# Numba caches: one directory per core (/tmp/numba-cache/<core> inside its root). numba keys
# entries by (LLVM triple, CPU name, CPU features), so a shared directory would still never hand
# one board's code to another (tests/test_threads_cache.py); separate directories also avoid two
# targets rewriting one index at once. The roots persist in ARM_DIR between runs (warm caches);
# ARM_COLD=1 empties the numba caches first (what a fresh CI machine sees).
#
# knobs: ARM_CORES, ARM_FILES, ARM_K, ARM_PARALLEL, ARM_COLD, ARM_DIR (default
# ~/.cache/sparsedge-arm-ci), PYTHON (host python with pip, default .venv/bin/python), and the
# runner's own (PY_REQS, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
ARM_CORES=${ARM_CORES:-"cortex-a53 cortex-a76"}
ARM_FILES=${ARM_FILES:-"tests/test_kernels_f32.py tests/test_kernels_int8.py tests/test_runtime.py"}
ARM_K=${ARM_K:-"(test_shapes and csr_f32_spmm) or (test_rows_bit_exact and dense_i8) \
or test_concurrent_runs_identical or test_symbolic_dim_must_agree"}
ARM_BASE=${ARM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sparsedge-arm-ci}
PY=${PYTHON:-.venv/bin/python}
RUNNER=../shared/arm/run-aarch64.sh
OUT=build/arm
t0=$SECONDS
say() { echo "=== [arm +$((SECONDS - t0))s] $*"; }
ncores=$(echo "$ARM_CORES" | wc -w)
PAR=${ARM_PARALLEL:-$([ "$(nproc)" -ge 2 ] && [ "$ncores" -ge 2 ] && echo 1 || echo 0)}

[ "$(id -u)" = 0 ] || { echo "arm.sh: run as root (qemu binfmt + chroot)" >&2; exit 1; }
[ -f "$RUNNER" ] || { echo "arm.sh: $RUNNER not found (../shared beside the project root)" >&2; exit 1; }

say "wheel + pip --target $OUT/site"
rm -rf "$OUT/wheel" "$OUT/site" "$OUT"/int8-*.npz "$OUT"/log-*.txt
mkdir -p "$OUT"
# without build isolation when the venv has a recent setuptools (offline, fast), else the usual way
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT/wheel" . >"$OUT/wheel.log" 2>&1 \
  || "$PY" -m pip wheel -q --no-deps -w "$OUT/wheel" . >>"$OUT/wheel.log" 2>&1 \
  || { cat "$OUT/wheel.log" >&2; exit 1; }
"$PY" -m pip install -q --no-deps --no-compile --target "$OUT/site" "$OUT"/wheel/sparsedge-*.whl

# The command run inside the arm64 root for one core: $1 = cold flag, $2 = -k expression, rest = files.
# shellcheck disable=SC2016
INNER='
set -e
export NUMBA_CACHE_DIR=/tmp/numba-cache/$QEMU_CPU
if [ "$1" = 1 ]; then rm -rf "$NUMBA_CACHE_DIR"; fi
k=$2; shift 2
python3 -c "import platform, sparsedge; assert platform.machine() == \"aarch64\", platform.machine(); print(\"sparsedge\", sparsedge.__version__, \"from\", sparsedge.__file__)"
python3 .ci/arm_check.py "build/arm/int8-$QEMU_CPU.npz"
rc=0
python3 -m pytest -q -p no:cacheprovider -k "$k" --durations=10 "$@" || rc=$?
[ $rc = 5 ] && echo "arm.sh: no test selected by ARM_K" >&2
exit $rc
'

run_core() {  # $1 core, $2 its ARM_DIR
  local start=$SECONDS
  # shellcheck disable=SC2086
  ARM_DIR=$2 QEMU_CPU=$1 PYTHONPATH=/work/$OUT/site bash "$RUNNER" bash -c "$INNER" bash \
    "${ARM_COLD:-0}" "$ARM_K" $ARM_FILES
  echo "=== [arm] $1: passed in $((SECONDS - start)) s"
}

first=""
for core in $ARM_CORES; do
  dir=$ARM_BASE/$core
  if [ -n "$first" ] && [ ! -x "$dir/rootfs-arm64/usr/bin/python3" ] && [ -x "$first/rootfs-arm64/usr/bin/python3" ]; then
    mkdir -p "$dir"
    cp -a --reflink=auto "$first/rootfs-arm64" "$dir/"   # offline copy instead of a second download
    rm -rf "$dir/rootfs-arm64/tmp/numba-cache"
  fi
  if [ -z "$first" ]; then
    say "set up the arm64 root (first run: apt + mmdebstrap + aarch64 wheels, about half a minute)"
    ARM_DIR=$dir bash "$RUNNER" true
    first=$dir
  fi
done

pids=() names=()
for core in $ARM_CORES; do
  if [ "$PAR" = 1 ]; then
    say "$core: started (log $OUT/log-$core.txt)"
    ( run_core "$core" "$ARM_BASE/$core" ) >"$OUT/log-$core.txt" 2>&1 &
    pids+=($!) names+=("$core")
    # let this runner register binfmt and enter its chroot before the next one re-registers it
    for _ in $(seq 1 60); do grep -q "arm64 (QEMU_CPU" "$OUT/log-$core.txt" 2>/dev/null && break; sleep 1; done
    sleep 2
  else
    say "$core"
    run_core "$core" "$ARM_BASE/$core" 2>&1 | tee "$OUT/log-$core.txt"
    [ "${PIPESTATUS[0]}" = 0 ] || { say "$core FAILED"; exit 1; }
  fi
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then st=passed; else st=FAILED; failed=1; fi
  say "${names[$i]}: $st; its output:"
  grep -v "^WARNING: \|Location 'file:" "$OUT/log-${names[$i]}.txt" | sed "s/^/[${names[$i]}] /"
done
[ "$failed" = 0 ] || { say "emulated tests failed"; exit 1; }

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
            n = int(np.sum(a.view(np.uint32) != b.view(np.uint32))) if a.shape == b.shape else "shape"
            bad.append(f"{k}: {sys.argv[1]} vs {other}: {n} elements differ")
print(f"{len(first.files)} int8 rows compared across {len(sys.argv) - 1} cores: "
      + ("identical" if not bad else "DIFFERENT"))
if bad:
    print("int8 results differ between cores:\n  " + "\n  ".join(bad), file=sys.stderr)
    sys.exit(1)
EOF
say "arm job passed"
