"""``sparsedge bench``: run the benchmark suite, compare two results, draw a report.

    sparsedge bench [all|kernels|models|coldstart|MODEL ...] [--quick] [--json OUT] [--threads N]
    sparsedge bench compare A.json B.json [--filter TEXT] [--all]
    sparsedge bench report A.json [--plot OUT.png] [--markdown OUT.md]

Suites: ``kernels`` (every GEMM row of the kernel table on the kernels-issue shapes and
sparsities, with numpy / scipy / torch / onnxruntime side by side), ``coldstart`` (per kernel:
compile with an empty numba cache, load with a warm one, each in a new process), ``models``
(the demo MLP, a BERT-style encoder, a ResNet-style CNN at dense / 90% / 90%+int8 against
onnxruntime float32 and dynamic int8; file size, planned arena, peak RSS). A model name
(``demo``, ``bert``, ``resnet``) runs that model only. ``--quick``: one case per kernel family
and per model with few repetitions (the CI check). The JSON schema is ``bench/schema.json``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time

DESCRIPTION = __doc__
SUITES = ("kernels", "coldstart", "models")


def add_arguments(p) -> None:
    p.add_argument("what", nargs="*", default=[],
                   help="all | kernels | models | coldstart | a model name (demo, bert, resnet); "
                        "or: compare A.json B.json; or: report A.json")
    p.add_argument("--quick", action="store_true", help="one case per kernel family / model, few repetitions")
    p.add_argument("--json", metavar="OUT", help="write the result JSON here (schema: bench/schema.json)")
    p.add_argument("--threads", type=int, default=None, help="threads for sparsedge and peers (default: all cores)")
    p.add_argument("--kernels", metavar="TEXT", default=None, help="only kernel rows whose name contains TEXT")
    p.add_argument("--shapes", default=None,
                   help="comma list of kernel shapes (ffn_n128, ffn_n1, ffn_n1_dram, conv1x1, sq1024_n32, conv3x3)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per group (default 3, quick 0.6)")
    p.add_argument("--peers", default=None,
                   help="comma list of peers (numpy_dense, scipy_csr, torch_dense, torch_csr, ort_f32, ort_int8)")
    p.add_argument("--dram-pool-mb", type=int, default=128,
                   help="size of the weight pool of the DRAM-streamed batch-1 case (MB of dense float32)")
    p.add_argument("--no-peak", action="store_true", help="do not measure the FMA peak")
    p.add_argument("--plot", metavar="OUT.png", help="report: write the plot here (needs matplotlib)")
    p.add_argument("--markdown", metavar="OUT.md", help="report: write the markdown tables here")
    p.add_argument("--filter", default=None, help="compare/report: only case ids containing TEXT")
    p.add_argument("--all", action="store_true", help="compare: show every case (default: sparsedge cases)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    from ..errors import InputError

    what = list(args.what)
    if what and what[0] == "compare":
        if len(what) != 3:
            raise InputError("usage: sparsedge bench compare A.json B.json", field="what")
        from .compare import compare_files

        print(compare_files(what[1], what[2], filt=args.filter, show_all=args.all))
        return 0
    if what and what[0] == "report":
        if len(what) != 2:
            raise InputError("usage: sparsedge bench report A.json [--plot OUT.png]", field="what")
        from .report import report_file

        print(report_file(what[1], plot=args.plot, markdown=args.markdown, filt=args.filter))
        return 0
    return run_suites(args, what)


def run_suites(args, what) -> int:
    from ..errors import InputError
    from .schema import SCHEMA_ID, errors, sanitize

    models: list[str] = []
    suites: list[str] = []
    for w in what or ["all"]:
        if w == "all":
            suites += [s for s in SUITES if s not in suites]
        elif w in SUITES:
            suites.append(w) if w not in suites else None
        else:
            from .model_suite import MODEL_NAMES

            if w not in MODEL_NAMES:
                raise InputError(f"unknown suite or model {w!r} (choose from all, {', '.join(SUITES)}, "
                                 f"{', '.join(MODEL_NAMES)}, compare, report)", field="what")
            models.append(w)
            if "models" not in suites:
                suites.append("models")
    import numba

    from ..runtime import threads as _rt_threads

    _rt_threads.configure()  # the runtime's threading layer (tbb / omp / workqueue), before any kernel runs
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    if threads < 1:
        raise InputError("--threads must be >= 1", field="threads")
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    t0 = time.perf_counter()
    from .machine import machine_record

    _log(f"sparsedge bench: {', '.join(suites)}{' (quick)' if args.quick else ''}, {threads} threads")
    machine = machine_record(measure_peak=not args.no_peak)
    from .machine import summary_line

    _log("  machine: " + summary_line(machine))
    peak = (machine.get("fma_peak") or {}).get("gflops")
    doc = {"schema": SCHEMA_ID, "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": ["sparsedge", "bench"] + sys.argv[2:] if sys.argv[1:2] == ["bench"] else list(sys.argv),
           "mode": "quick" if args.quick else "full", "suites": suites, "machine": machine,
           "settings": {"threads": threads,
                        # OpenBLAS worker spinning between interleaved calls (see bench/__init__.py)
                        "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                        # torch's OpenMP workers: passive waiting between interleaved calls (same reason)
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
           "cases": [], "skipped": []}
    peers_filter = tuple(args.peers.split(",")) if args.peers else None
    # numpy's BLAS (the numpy_dense peer and the runtime's dense layers) gets the same thread
    # count as numba, torch and onnxruntime (threadpoolctl when installed; recorded either way)
    from .peers import blas_threads

    try:
        import threadpoolctl  # noqa: F401
        doc["settings"]["blas_threads_limited"] = True
    except Exception:
        doc["settings"]["blas_threads_limited"] = False
    with blas_threads(threads):
        _run_selected(args, doc, suites, models, threads, peers_filter, peak)
    try:
        doc["machine"]["numba"]["threading_layer"] = numba.threading_layer()
    except ValueError:
        pass
    doc["duration_s"] = round(time.perf_counter() - t0, 2)
    doc = sanitize(doc)
    errs = errors(doc)
    if errs:  # a bug in the suite, not a user error: keep the file for inspection
        _log("warning: result does not validate against bench/schema.json: " + "; ".join(errs[:5]))
    from .report import text_summary

    print(text_summary(doc))
    if args.json:
        _atomic_write_json(args.json, doc)
        _log(f"wrote {args.json} ({len(doc['cases'])} cases, {doc['duration_s']:.0f}s)")
    return 0 if not errs else 3


def _run_selected(args, doc, suites, models, threads, peers_filter, peak) -> None:
    from ..errors import InputError

    kernel_names: list[str] = []
    if "kernels" in suites:
        from . import kernels as K

        shapes = args.shapes.split(",") if args.shapes else None
        if shapes:
            bad = [s for s in shapes if s not in K.SHAPE_BY_ID]
            if bad:
                raise InputError(f"unknown shape(s) {bad} (choose from {', '.join(K.SHAPE_BY_ID)})", field="shapes")
        _log("kernels:")
        res = K.run_suite(quick=args.quick, threads=threads, shapes=shapes, kernel_filter=args.kernels,
                          budget=args.budget, peers_filter=peers_filter, dram_pool_mb=args.dram_pool_mb,
                          peak_gflops=peak, log=_log)
        doc["cases"] += res["cases"]
        doc["skipped"] += res["skipped"]
        doc["settings"]["kernels"] = res["settings"]
        kernel_names = sorted({c["impl"] for c in res["cases"] if c["kind"] == "sparsedge" and "error" not in c})
    if "coldstart" in suites:
        from . import kernels as K

        if not kernel_names:
            rows, _ = K.select_rows(args.quick, args.kernels)
            kernel_names = [r.name for r in rows]
        if args.quick:
            kernel_names = kernel_names[:3]
        _log(f"cold start ({len(kernel_names)} kernels):")
        doc["cases"] += K.cold_start(kernel_names, threads=threads, log=_log)
    if "models" in suites:
        from .model_suite import run_models

        _log("models:")
        res = run_models(models or None, quick=args.quick, threads=threads, budget=args.budget,
                         peers_filter=peers_filter, log=_log)
        doc["cases"] += res["cases"]
        doc["skipped"] += res["skipped"]
        doc["settings"]["models"] = res["settings"]


def _atomic_write_json(path, doc) -> None:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
