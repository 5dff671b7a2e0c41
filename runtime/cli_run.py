"""``sparsedge run MODEL --input NAME=FILE.npy ... [--output OUT.npz] [--threads N] [--profile]``."""
from __future__ import annotations

import os
import sys
import time

DESCRIPTION = """Run a model file on .npy inputs (loaded with allow_pickle=False).

Prints each output's name, shape, dtype and a few values; --output writes every output into one
.npz file (atomically). --profile prints per-op times; --report prints the kernel selection."""


def add_arguments(p):
    p.add_argument("model", help="a .sparsedge model file")
    p.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input array (repeat for every model input)")
    p.add_argument("--output", "-o", metavar="OUT.npz", help="write the outputs to this .npz file")
    p.add_argument("--threads", type=int, default=None, help="threads per call (default: all cores)")
    p.add_argument("--profile", action="store_true", help="print per-op times")
    p.add_argument("--repeat", type=int, default=1, help="run N times (timing); outputs of the last run")
    p.add_argument("--report", action="store_true", help="print the kernel selection report")
    p.add_argument("--tune", action="store_true", help="time candidate kernels first (cached in MODEL.tune.json)")
    p.add_argument("--no-verify", action="store_true", help="skip buffer checksums at load (trusted files)")


def parse_inputs(items) -> dict:
    import numpy as np

    from ..errors import InputError

    feeds = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--input must be NAME=FILE.npy, got {item!r}", field="--input")
        name, path = item.split("=", 1)
        if name in feeds:
            raise InputError("given twice", tensor=name, field="--input")
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read {path!r} as a .npy array: {e}", tensor=name, field="--input") from None
        if not isinstance(a, np.ndarray):
            raise InputError(f"{path!r} is not a single .npy array", tensor=name, field="--input")
        feeds[name] = a
    return feeds


def write_npz(path, arrays: dict):
    import numpy as np

    from ..formats.atomic import atomic_write

    with atomic_write(path) as f:
        np.savez(f, **arrays)


def run(args) -> int:
    import numpy as np

    from . import Session

    feeds = parse_inputs(args.input)
    t0 = time.perf_counter()
    sess = Session(args.model, threads=args.threads, tune=args.tune, profile=args.profile,
                   verify_checksums=not args.no_verify)
    t1 = time.perf_counter()
    times = []
    outs = None
    for _ in range(max(1, args.repeat)):
        s = time.perf_counter()
        outs = sess.run(None, feeds)
        times.append(time.perf_counter() - s)
    names = [o.name for o in sess.get_outputs()]
    for n, a in zip(names, outs):
        flat = a.reshape(-1)[:6]
        print(f"{n}: shape {list(a.shape)} {a.dtype} [{', '.join(f'{v:.6g}' for v in flat.tolist())}"
              f"{', ...' if a.size > 6 else ''}]")
    first = times[0] * 1e3
    msg = f"load {1e3 * (t1 - t0):.1f} ms, first run {first:.2f} ms"
    if len(times) > 1:
        msg += f", median of {len(times) - 1} more {1e3 * float(np.median(times[1:])):.3f} ms"
    print(msg + f" (threads {sess.threads}, layer {sess.threading_layer})", file=sys.stderr)
    if args.output:
        write_npz(args.output, dict(zip(names, outs)))
        print(f"wrote {args.output}", file=sys.stderr)
    if args.profile:
        print(sess.profile_report())
    if args.report:
        print(sess.format_selection_report())
    return 0
