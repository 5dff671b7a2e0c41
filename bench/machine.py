"""The machine record stored in every benchmark JSON, so boards and revisions can be compared.

``machine_record(measure_peak=True) -> dict`` (see ``bench/schema.json``, key ``machine``):
CPU model / LLVM CPU name / features, cores, OS, python, numpy / numba / scipy / llvmlite /
sparsedge versions, numba threading layer and thread count, BLAS (numpy's build config and,
when threadpoolctl is installed, the loaded library and its threads), peer versions, and the
measured float32 FMA peak (``kernels/peak.py``) in GFLOP/s at 1 and at all threads.
"""
from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
import time

# features worth recording (llvmlite names); the full list is kept too
_KEY_FEATURES = ("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni",
                 "avxvnni", "avx512bf16", "avx512fp16", "amx-int8", "neon", "dotprod", "i8mm", "sve", "sve2",
                 "fullfp16", "bf16")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k.strip() in ("model name", "Model", "Hardware", "cpu model"):
                    return v.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_info() -> dict:
    """CPU name and features: from sparsedge.kernels.cpu when available, else llvmlite."""
    rec: dict = {"model": _cpu_model(), "arch": platform.machine()}
    try:
        cpu = importlib.import_module("sparsedge.kernels.cpu")
        for fn in ("cpu_info", "host_cpu", "info"):
            f = getattr(cpu, fn, None)
            if callable(f):
                got = f()
                if isinstance(got, dict):
                    rec["sparsedge_cpu"] = {k: (sorted(v) if isinstance(v, (set, frozenset)) else v)
                                            for k, v in got.items() if _jsonable(v)}
                else:
                    rec["sparsedge_cpu"] = {k: getattr(got, k) for k in ("name", "features", "arch")
                                            if hasattr(got, k) and _jsonable(getattr(got, k))}
                    if isinstance(rec["sparsedge_cpu"].get("features"), (set, frozenset)):
                        rec["sparsedge_cpu"]["features"] = sorted(rec["sparsedge_cpu"]["features"])
                break
    except Exception:  # kernels/cpu.py not there (yet) or failing: llvmlite below is enough
        pass
    try:
        import llvmlite.binding as ll

        rec["llvm_name"] = os.environ.get("NUMBA_CPU_NAME") or ll.get_host_cpu_name()
        feats = sorted(k for k, v in ll.get_host_cpu_features().items() if v)
        rec["features"] = feats
        rec["key_features"] = [f for f in _KEY_FEATURES if f in feats]
    except Exception as e:  # pragma: no cover - llvmlite always comes with numba
        rec["features"] = []
        rec["key_features"] = []
        rec["llvm_error"] = str(e)
    return rec


def _jsonable(v) -> bool:
    return isinstance(v, (str, int, float, bool, list, tuple, set, frozenset, type(None))) or (
        isinstance(v, dict) and all(isinstance(k, str) for k in v))


def _caches() -> dict:
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            p = os.path.join(base, d)
            try:
                level = open(os.path.join(p, "level")).read().strip()
                typ = open(os.path.join(p, "type")).read().strip()
                size = open(os.path.join(p, "size")).read().strip()
            except OSError:
                continue
            if typ == "Instruction":
                continue
            out[f"L{level}"] = size
    except OSError:
        pass
    return out


def l3_bytes(default: int = 32 << 20) -> int:
    """Last-level cache size in bytes (from sysfs), or ``default`` when unknown."""
    c = _caches()
    for k in ("L3", "L2"):
        if k in c:
            s = c[k].upper()
            mult = 1 << 20 if s.endswith("M") else 1 << 10 if s.endswith("K") else 1
            try:
                return int(s.rstrip("KMB")) * mult
            except ValueError:
                pass
    return default


def _blas() -> dict:
    rec: dict = {}
    try:
        import numpy as np

        cfg = np.show_config(mode="dicts")
        b = (cfg.get("Build Dependencies") or {}).get("blas") or {}
        rec["numpy_build"] = {k: b.get(k) for k in ("name", "version", "openblas configuration") if b.get(k)}
    except Exception:
        pass
    try:
        import threadpoolctl

        rec["threadpools"] = [{k: d.get(k) for k in ("user_api", "internal_api", "version", "num_threads",
                                                       "threading_layer", "architecture")}
                              for d in threadpoolctl.threadpool_info()]
    except Exception:
        rec["threadpools"] = None
    return rec


def _version(mod: str):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "unknown")
    except Exception:
        return None


def _numba() -> dict:
    import numba

    rec = {"version": numba.__version__, "threads": int(numba.get_num_threads()),
           "max_threads": int(numba.config.NUMBA_NUM_THREADS),
           "threading_layer_config": str(numba.config.THREADING_LAYER)}
    try:
        rec["threading_layer"] = numba.threading_layer()
    except ValueError:  # no parallel function has run yet: report what would be used
        rec["threading_layer"] = None
    return rec


def fma_peak() -> dict | None:
    """Measured float32 FMA peak via ``sparsedge.kernels.peak.fma_peak`` (None if unavailable).

    ``gflops_1thread``: one thread, timed by its CPU time (robust to other processes);
    ``gflops_all``: all numba threads, wall time (low on a busy machine); ``gflops`` (what
    ``peak_fraction`` divides by): the larger of ``gflops_all`` and threads x ``gflops_1thread``.
    """
    try:
        import numba

        peak = importlib.import_module("sparsedge.kernels.peak")
        f = getattr(peak, "fma_peak")
        n = int(numba.get_num_threads())
        one = float(f(1))
        alln = float(f(n)) if n > 1 else one
        return {"gflops": max(alln, one * n), "gflops_1thread": one, "gflops_all": alln, "threads": n,
                "source": "sparsedge.kernels.peak.fma_peak"}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"} if not isinstance(e, ImportError) else None


def machine_record(measure_peak: bool = True) -> dict:
    """The full machine record (JSON-serialisable)."""
    t0 = time.perf_counter()
    try:
        from sparsedge import __version__ as sv
    except Exception:
        sv = None
    rec = {
        "hostname": socket.gethostname(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": _cpu_info(),
        "caches": _caches(),
        "versions": {"sparsedge": sv, "numpy": _version("numpy"), "numba": _version("numba"),
                     "llvmlite": _version("llvmlite"), "scipy": _version("scipy")},
        "peers": {"torch": _version("torch"), "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx")},
        "numba": _numba(),
        "blas": _blas(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                            "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_CPU_NAME",
                                            "NUMBA_CACHE_DIR") if k in os.environ},
        "fma_peak": fma_peak() if measure_peak else None,
    }
    try:
        from sparsedge.git_version import describe  # optional, not required
        rec["git"] = describe()
    except Exception:
        rec["git"] = _git_rev()
    rec["record_seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _git_rev():
    """The sparsedge source revision when running from a git checkout, else None."""
    import subprocess

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(here, ".git")):
        return None
    try:
        r = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=5)
        d = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5)
        return (r.stdout.strip() + ("+dirty" if d.stdout.strip() else "")) or None
    except Exception:
        return None


def summary_line(m: dict) -> str:
    """One line for report headers: CPU, cores, threads, BLAS, peak."""
    cpu = m.get("cpu", {})
    peak = (m.get("fma_peak") or {}).get("gflops")
    blas = (m.get("blas") or {}).get("numpy_build", {}).get("name", "?")
    return (f"{cpu.get('model', '?')} ({cpu.get('llvm_name', '?')}), {m.get('cores')} cores, "
            f"numba {m.get('versions', {}).get('numba')} {m.get('numba', {}).get('threads')} threads "
            f"[{m.get('numba', {}).get('threading_layer') or m.get('numba', {}).get('threading_layer_config')}], "
            f"BLAS {blas}" + (f", FMA peak {peak:.0f} GFLOP/s" if isinstance(peak, (int, float)) else ""))


if __name__ == "__main__":  # pragma: no cover
    import json

    json.dump(machine_record(), sys.stdout, indent=2)
    print()
