"""``sparsedge warmup MODEL [--shape NAME:D1,...]``: precompile (or load from numba's cache) every
kernel the model needs on this board, by running it once on zeros at its declared shapes
(symbolic dims = 1 unless given), and report the time. Run once after installing on a board so
that later processes start fast."""
from __future__ import annotations

import sys
import time

DESCRIPTION = __doc__


def add_arguments(p):
    p.add_argument("model")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...")
    p.add_argument("--threads", type=int, default=None)


def run(args) -> int:
    import numpy as np

    t0 = time.perf_counter()
    from . import Session
    from .cli_tune import parse_shapes

    t1 = time.perf_counter()
    sess = Session(args.model, threads=args.threads)
    t2 = time.perf_counter()
    shapes = parse_shapes(args.shape, sess)
    feeds = {v.name: np.zeros(shapes[v.name], dtype=v.dtype) for v in sess.get_inputs()}
    sess.run(None, feeds)
    t3 = time.perf_counter()
    sess.run(None, feeds)
    t4 = time.perf_counter()
    kernels = sorted({r["kernel"] for r in sess.selection_report()})
    print(f"warmed {len(kernels)} weight kernel(s) {kernels} at shapes {shapes}")
    print(f"import {1e3 * (t1 - t0):.0f} ms, load {1e3 * (t2 - t1):.0f} ms, first run (compile or cache load) "
          f"{1e3 * (t3 - t2):.0f} ms, second run {1e3 * (t4 - t3):.1f} ms; threading layer {sess.threading_layer}",
          file=sys.stderr)
    return 0
