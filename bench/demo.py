"""``sparsedge demo``: convert the shipped digits model three ways, run all three, compare.

The model (``bench/data``, trained by ``python -m sparsedge.bench.train_demo``): an MLP
64 -> 1024 -> 1024 -> 1024 -> 10 on scikit-learn's digits, float16 safetensors plus the MLP
template's ``config.json``, and 360 held-out test images (``digits_test_x.npy`` float32
[360, 64], already scaled to [0, 1]; ``digits_test_y.npy`` int64 labels). Torch-free: the
converter's template path builds the graph from ``config.json``.

Levels: ``dense`` (float32, ``--format dense``), ``sparse90`` (``--prune 0.9``: per-layer
magnitude pruning, stored CSR), ``sparse90_int8`` (``--prune 0.9 --quant int8 --format csr``:
the same pruning with int8 weights, activations quantized at run time). Each runs on the whole
test batch with ``sparsedge.runtime.Session``; the table shows accuracy, agreement with the
dense model, file size, median latency of one batch (the three timed interleaved) and speedup
against the dense model, then the runtime's kernel choice per layer.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

DESCRIPTION = __doc__
DATA_DIR = Path(__file__).resolve().parent / "data"
LEVELS = [
    ("dense", "float32, stored dense", dict(fmt="dense")),
    ("sparse90", "90% pruned, float32 CSR", dict(prune="0.9", fmt="csr")),
    ("sparse90_int8", "90% pruned + int8 CSR", dict(prune="0.9", quant="int8", fmt="csr")),
]


def add_arguments(p) -> None:
    p.add_argument("--out", metavar="DIR", default=None, help="keep the converted models here (default: a temp dir)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as bench JSON (bench/schema.json)")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--budget", type=float, default=6.0, help="seconds of interleaved timing (default 6)")
    p.add_argument("--data", metavar="DIR", default=str(DATA_DIR), help=argparse_help_data())
    p.add_argument("--report", action="store_true", help="print the full selection report of each model")


def argparse_help_data() -> str:
    return "folder with digits_mlp.safetensors, config.json and the test .npy files (default: the shipped one)"


def _say(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:.0f} KB"


def _kernel_summary(rep: list) -> str:
    counts: dict = {}
    for r in rep:
        k = r.get("kernel", "?")
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in counts.items())


def run(args) -> int:
    import numpy as np

    from ..errors import InputError

    t0 = time.perf_counter()
    data = Path(args.data)
    files = {k: data / v for k, v in (("model", "digits_mlp.safetensors"), ("config", "config.json"),
                                      ("x", "digits_test_x.npy"), ("y", "digits_test_y.npy"))}
    for k, p in files.items():
        if not p.is_file():
            raise InputError("demo data missing (re-train with `python -m sparsedge.bench.train_demo`)", file=str(p))
    x = np.load(files["x"], allow_pickle=False)
    y = np.load(files["y"], allow_pickle=False)
    if x.ndim != 2 or x.dtype != np.float32 or y.shape != (x.shape[0],):
        raise InputError(f"test inputs must be float32 [n, 64] with n labels, got {x.dtype}{list(x.shape)} "
                         f"and {list(y.shape)}", file=str(files["x"]))
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be >= 1", field="threads")
    from ..loaders import convert
    from ..runtime import Session

    tmp = None
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="sparsedge-demo-")
        out = Path(tmp.name)
    print(f"sparsedge demo: digits MLP ({files['model'].name}, {_size(files['model'].stat().st_size)} float16), "
          f"{x.shape[0]} held-out test images", flush=True)
    try:
        results = []
        sessions = {}
        # the converter's accuracy report runs on a calibration subset (its cost grows with it);
        # the demo's own accuracy below uses all test images
        calib = out / "digits_calib.npy"
        np.save(calib, np.ascontiguousarray(x[:96]), allow_pickle=False)
        for i, (name, label, kw) in enumerate(LEVELS):
            path = out / f"digits_{name}.sparsedge"
            _say(f"[{i + 1}/{len(LEVELS)}] converting {name} ({label}) -> {path.name}", t0)
            tc = time.perf_counter()
            res = convert(str(files["model"]), str(path), calib=str(calib), progress=False, **kw)
            conv_s = time.perf_counter() - tc
            ts = time.perf_counter()
            sess = Session(str(path), threads=args.threads)
            feeds = {sess.get_inputs()[0].name: x}
            logits = sess.run(None, feeds)[0]  # first run: numba kernels load (or compile once)
            first_s = time.perf_counter() - ts
            sessions[name] = (sess, feeds)
            formats = sorted({ly.get("kind", "?") for ly in res.layers})
            results.append({"level": name, "label": label, "path": str(path), "file_bytes": path.stat().st_size,
                            "convert_s": conv_s, "first_run_s": first_s, "formats": formats,
                            "pred": logits.argmax(1), "arena_bytes": sess.plan_info(feeds_shapes(feeds))["arena_bytes"],
                            "selection": sess.selection_report()})
            _say(f"      {_size(results[-1]['file_bytes'])}, converted in {conv_s:.1f}s, "
                 f"loaded + first run {first_s:.2f}s", t0)
        from .timing import interleaved

        _say(f"timing the three models side by side (~{args.budget:.0f}s, interleaved rounds)", t0)
        fns = {name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f) in sessions.items()}
        timed = interleaved(fns, budget=args.budget, min_rounds=5, rounds=40, round_time=0.05)
        dense_t = timed["dense"]["median"]
        dense_pred = results[0]["pred"]
        for r in results:
            st = timed[r["level"]]
            r.update({"accuracy": float((r["pred"] == y).mean()), "agree": float((r["pred"] == dense_pred).mean()),
                      "median_s": st["median"], "time_s": st, "speedup": dense_t / st["median"]})
        _print_table(results, x.shape[0], sessions["dense"][0].threads)
        print("\nkernels chosen by the runtime (per layer):")
        for r in results:
            print(f"  {r['level']:<14} {_kernel_summary(r['selection'])}")
        if args.report:
            for name, (s, _) in sessions.items():
                print(f"\n{name}:\n{s.format_selection_report()}")
        if args.json:
            _write_json(args.json, results, sessions, x.shape[0])
            print(f"\nwrote {args.json}")
        if args.out:
            print(f"\nmodels kept in {out}/ (try: sparsedge inspect {results[-1]['path']})")
        _say("done", t0)
        for s, _ in sessions.values():
            s.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def feeds_shapes(feeds: dict) -> dict:
    return {k: tuple(v.shape) for k, v in feeds.items()}


def _print_table(results, n, threads) -> None:
    print(f"\nbatch of {n} images, {threads} threads; median of interleaved runs\n")
    hdr = f"{'model':<15} {'weights':<24} {'accuracy':>8} {'agree w/ dense':>14} {'file':>9} {'latency':>10} {'speedup':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['level']:<15} {r['label']:<24} {r['accuracy'] * 100:7.1f}% {r['agree'] * 100:13.1f}% "
              f"{_size(r['file_bytes']):>9} {r['median_s'] * 1e3:8.2f}ms {r['speedup']:7.2f}x")


def _write_json(path, results, sessions, n) -> None:
    import datetime as dt
    import json

    from .cli import _atomic_write_json
    from .machine import machine_record
    from .schema import SCHEMA_ID, errors, sanitize

    cases = []
    for r in results:
        cases.append({"suite": "demo", "id": f"demo/digits_mlp/{r['level']}", "group": "demo/digits_mlp",
                      "impl": r["level"], "kind": "sparsedge", "model": "digits_mlp", "level": r["level"],
                      "median_s": r["median_s"], "time_s": r["time_s"], "accuracy": r["accuracy"],
                      "agreement_with_dense": r["agree"], "ratio_sparsedge_dense": r["speedup"],
                      "file_bytes": r["file_bytes"], "arena_bytes": r["arena_bytes"], "formats": r["formats"],
                      "convert_s": r["convert_s"], "first_run_s": r["first_run_s"],
                      "threads": sessions[r["level"]][0].threads, "shape": {"n": n},
                      "selection": {"kernels": [s.get("kernel") for s in r["selection"]]}})
    doc = sanitize({"schema": SCHEMA_ID, "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "command": ["sparsedge", "demo"] + sys.argv[2:], "mode": "quick", "suites": ["demo"],
                    "machine": machine_record(measure_peak=False), "cases": cases})
    errs = errors(doc)
    if errs:
        print("warning: demo JSON does not validate: " + "; ".join(errs[:3]), file=sys.stderr)
    _atomic_write_json(path, doc)
