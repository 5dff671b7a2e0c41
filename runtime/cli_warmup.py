"""``sparsedge warmup MODEL [--shape NAME:D1,...]``: precompile (or load from numba's cache) every
kernel the model needs on this board, by running it once on zeros at its declared shapes
(symbolic dims = 1, then = 8, so both the batch-1 and the batched kernels are ready; or the
--shape given), and report the time. Run once after installing on a board so
that later processes start fast."""
from __future__ import annotations

import sys
import time

DESCRIPTION = __doc__


_COLD = r"""
import json, sys, time
c0 = time.process_time()
t0 = time.perf_counter()
import numpy as np
from sparsedge.runtime import Session
t1 = time.perf_counter()
s = Session(sys.argv[1], threads=None if sys.argv[3] == "None" else int(sys.argv[3]))
t2 = time.perf_counter()
shapes = json.loads(sys.argv[2])
feeds = {v.name: np.zeros(shapes[v.name], dtype=v.dtype) for v in s.get_inputs()}
s.run(None, feeds)
t3 = time.perf_counter()
c3 = time.process_time()
print(json.dumps({"import_ms": 1e3 * (t1 - t0), "load_ms": 1e3 * (t2 - t1), "first_run_ms": 1e3 * (t3 - t2),
                  "total_ms": 1e3 * (t3 - t0), "cpu_ms": 1e3 * (c3 - c0)}))
"""


def add_arguments(p):
    p.add_argument("model")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cold", type=int, default=1, metavar="K",
                   help="then measure cold start K times in new processes (import + load + first run with "
                        "the warm numba cache; default 1, 0 = skip)")


def cold_start(model, shapes, threads, k=1) -> list:
    """Cold start in ``k`` fresh interpreters: [{import_ms, load_ms, first_run_ms, total_ms}, ...]."""
    import json
    import subprocess

    res = []
    for _ in range(k):
        out = subprocess.run([sys.executable, "-c", _COLD, model, json.dumps(shapes), str(threads)],
                             capture_output=True, text=True, check=True)
        res.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return res


def run(args) -> int:
    import numpy as np

    t0 = t1 = time.perf_counter()
    from . import Session
    from .cli_tune import parse_shapes

    sess = Session(args.model, threads=args.threads)
    t2 = time.perf_counter()
    from ..errors import InputError

    variants = [parse_shapes(args.shape, sess)]
    if not args.shape:
        v8 = {v.name: tuple(d if isinstance(d, int) else 8 for d in v.shape) for v in sess.get_inputs()}
        if v8 != variants[0]:
            variants.append(v8)
    for shapes in variants:
        feeds = {v.name: np.zeros(shapes[v.name], dtype=v.dtype) for v in sess.get_inputs()}
        try:
            sess.run(None, feeds)
        except InputError as e:  # e.g. a symbolic dim that must match a fixed table size
            if shapes is variants[0]:
                raise
            print(f"skipped shapes {shapes}: {e}", file=sys.stderr)
    t3 = time.perf_counter()
    sess.run(None, feeds)
    t4 = time.perf_counter()
    shapes = variants
    kernels = sorted({r["kernel"] for r in sess.selection_report()})
    print(f"warmed {len(kernels)} weight kernel(s) {kernels} at shapes {shapes}")
    print(f"load {1e3 * (t2 - t1):.0f} ms, first runs (compile or cache load) "
          f"{1e3 * (t3 - t2):.0f} ms, second run {1e3 * (t4 - t3):.1f} ms; threading layer {sess.threading_layer}",
          file=sys.stderr)
    if args.cold > 0:
        runs = cold_start(args.model, {k: list(v) for k, v in shapes[0].items()}, args.threads, args.cold)
        best = min(runs, key=lambda r: r["total_ms"])
        med = sorted(r["total_ms"] for r in runs)[len(runs) // 2]
        print(f"cold start (new process, warm numba cache, shapes {shapes[0]}): median {med:.0f} ms of {len(runs)}; "
              f"best: import {best['import_ms']:.0f} ms + load {best['load_ms']:.0f} ms + first run "
              f"{best['first_run_ms']:.0f} ms = {best['total_ms']:.0f} ms wall, {best['cpu_ms']:.0f} ms CPU "
              f"(CPU time of the process, less sensitive to other load on the machine)")
    return 0
