"""``sparsedge warmup MODEL [--shape NAME:D1,...]``: precompile (or load from numba's cache) every
kernel the model needs on this board, by running it once on zeros at its declared shapes
(symbolic dims = 1, then = 8, so both the batch-1 and the batched kernels are ready; or the
--shape given), and report the time. Run once after installing on a board so
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
    print(f"import {1e3 * (t1 - t0):.0f} ms, load {1e3 * (t2 - t1):.0f} ms, first run (compile or cache load) "
          f"{1e3 * (t3 - t2):.0f} ms, second run {1e3 * (t4 - t3):.1f} ms; threading layer {sess.threading_layer}",
          file=sys.stderr)
    return 0
