"""``sparsedge tune MODEL [--shape NAME:D1,D2,...] [--threads N]``: time the candidate kernels of
every weight layer at the given input shapes, cache the fastest in MODEL.tune.json (keyed by CPU,
numba version and thread count) and print the selection report."""
from __future__ import annotations

import json

DESCRIPTION = __doc__


def add_arguments(p):
    p.add_argument("model")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2,...",
                   help="an input shape (symbolic dims need one); default: declared shape with symbols = 1")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def parse_shapes(items, sess) -> dict:
    from ..errors import InputError

    shapes = {}
    for it in items:
        if ":" not in it:
            raise InputError(f"--shape must be NAME:D1,D2,..., got {it!r}", field="--shape")
        name, dims = it.rsplit(":", 1)
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip() != "")
        except ValueError:
            raise InputError(f"dims must be ints, got {dims!r}", tensor=name, field="--shape") from None
    for v in sess.get_inputs():
        if v.name not in shapes:
            shapes[v.name] = tuple(d if isinstance(d, int) else default_dim(sess, d) for d in v.shape)
    return shapes


def default_dim(sess, sym) -> int:
    ex = (sess.metadata or {}).get("example_dims", {}) if isinstance(sess.metadata, dict) else {}
    v = ex.get(sym) if isinstance(ex, dict) else None
    return int(v) if isinstance(v, int) and v > 0 else 1


def run(args) -> int:
    from . import Session

    sess = Session(args.model, threads=args.threads, tune=True)
    shapes = parse_shapes(args.shape, sess)
    sess.output_shapes(shapes)  # plans (and tunes) every layer at these shapes
    if args.json:
        print(json.dumps(sess.selection_report(), indent=1))
    else:
        print(f"shapes {shapes}; threads {sess.threads}; cache {sess._selector.tune_path}")
        print(sess.format_selection_report())
    return 0
