#!/usr/bin/env bash
# The two entry points of the README, with all set-up on a fresh machine:
#   ./run.sh demo   convert the shipped digits model (dense, 90% sparse, sparse+int8), run, compare, bench
#   ./run.sh test   the test suite (kernels at 1 and 2 threads, formats, readers, runtime, converter)
# Set-up: a virtual environment in .venv with the project installed (editable) and its extras.
# torch is pinned to 2.13.0 because the development machines carry that CPU build on disk
# (an unpinned torch pulls a multi-GB CUDA build). SPARSEDGE_NO_TORCH=1 skips torch.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.sparsedge-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  extras="test,peers,plot"
  if [ "${SPARSEDGE_NO_TORCH:-0}" != 1 ]; then
    "$VENV/bin/pip" install -q "torch==2.13.0" || echo "run.sh: torch==2.13.0 not installable here; torch tests will skip" >&2
    extras="$extras,convert"
  fi
  "$VENV/bin/pip" install -q -e ".[$extras]"
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
cmd=${1:-test}; shift || true
case "$cmd" in
  demo) exec sparsedge demo "$@" ;;
  test) exec python -m pytest -q "$@" ;;
  *) exec "$cmd" "$@" ;;
esac
