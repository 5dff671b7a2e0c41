"""Kernel selection per weight layer: rules first, optional on-device tuning, user overrides,
and the selection report ("does sparsity help on this board?").

Candidates for a layer with weight format ``wf`` and ``N`` columns (tokens, or output pixels of
one image for a conv) are the kernel-table rows (``kernels.table.all_kernels()``) with op
``gemm`` / ``gemv`` whose format, value dtype, block shape and CPU requirements
(``kernels.cpu.has``) match and whose ``[min_n, max_n]`` contains N, plus built-in numpy paths:

* ``numpy_dense``: a dense float32 weight through numpy's BLAS, straight from the memory map
  (it also runs in torch layout, ``x @ W.T``, so a lone linear needs no transposes);
* ``scipy_csr``: a float32 CSR weight through scipy.sparse (arrays from the memory map);
* ``numpy_densified``: any format, dequantized/densified once at first use (a copy; the
  fallback when no kernel row fits, e.g. before a kernel module lands).

Rules (in order): a ``kernel_overrides`` entry; a tuned choice cached for this CPU / numba /
thread count; N == 1 prefers a ``gemv`` row; a row that needs a CPU feature this CPU has beats
a portable row; dense float32 prefers BLAS; otherwise the first matching row in table order;
otherwise a built-in path.

Tuning (``tune=True`` or ``sparsedge tune``) times every candidate once per (layer, N) on the
layer's real shape (random activations; interleaved rounds, fastest round counts), keeps the fastest, and also times the dense float32
equivalent through BLAS (``dense_blas_equivalent``: not selectable, it would need the dense
weights) so the report says whether the compressed format pays on this board. Choices are cached
beside the model in ``MODEL.tune.json`` keyed by CPU name, numba version and thread count.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..formats.atomic import atomic_write

BUILTIN_PREFIX = ("numpy_", "scipy_")


@dataclass
class Candidate:
    name: str
    kind: str  # "table" | "builtin"
    prepare: object  # prepare(wf) -> packed
    run: object  # run(packed, x[in,N], y[out,N], bias, act, lo, hi, residual)
    run_tl: object = None  # torch-layout run(packed, x2d[N,in], y2d[N,out], bias, act) or None
    spec: object = None
    notes: str = ""


@dataclass
class Choice:
    cand: Candidate
    packed: object
    why: str
    times_ms: dict = field(default_factory=dict)

    @property
    def name(self):
        return self.cand.name


# --- format facts ------------------------------------------------------------------------------
def weight_facts(wf) -> dict:
    """kind, value dtype, block, shape [out, in], density of a weight format object."""
    if isinstance(wf, np.ndarray):
        kind, meta = "dense", {}
    else:
        kind, meta = wf.kind, (wf.meta() if hasattr(wf, "meta") else {})
    if kind.endswith("_i8") or (kind == "lowrank" and meta.get("dtype") == "int8"):
        dtype = "int8"
    else:
        dtype = "float32"
    block = None
    if kind in ("bsr", "bsr_i8"):
        block = tuple(int(v) for v in meta["block"])
    elif kind == "nm":
        block = (int(meta["n"]), int(meta["m"]))
    shape = tuple(wf.shape)
    if len(shape) != 2:
        shape = (shape[0], int(np.prod(shape[1:])))
    try:
        density = float(wf.density) if not isinstance(wf, np.ndarray) else float(np.count_nonzero(wf)) / max(wf.size, 1)
    except Exception:
        density = 1.0
    if kind == "dense":
        density = 1.0 if dtype == "float32" else density
    return {"kind": kind, "dtype": dtype, "block": block, "shape": shape, "density": density,
            "value_dtype": getattr(wf, "dtype", "float32") if kind == "dense" else dtype}


def _dense2d(wf):
    a = wf if isinstance(wf, np.ndarray) else (wf.values if getattr(wf, "kind", "") == "dense" else wf.to_dense())
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    return a.reshape(a.shape[0], -1)


# --- built-in paths ----------------------------------------------------------------------------
def _epi(y, bias, act, residual):
    from .ops._common import epilogue_cols

    epilogue_cols(y, bias, act, residual)


def _dense_run(W, x, y, bias, act, lo, hi, residual):
    """y[out, N] = act(W @ x + bias + residual); output rows split over the call's threads (par).
    Activations other than none/relu/relu6 run after the split as one (numba) pass."""
    from . import par

    npy = act in (0, 1, 2)

    def part(o0, o1):
        np.matmul(W[o0:o1], x, out=y[o0:o1])
        if npy:
            _epi(y[o0:o1], None if bias is None else bias[o0:o1], act,
                 None if residual is None else residual[o0:o1])

    par.split(W.shape[0], part, float(W.shape[0]) * W.shape[1] * x.shape[1])
    if not npy:
        _epi(y, bias, act, residual)


def _dense_run_tl(W, x2d, y2d, bias, act, residual=None, ln=None):
    """y2d[N, out] = act(x2d @ W.T + bias + residual); token rows (or, for few tokens, output
    features) split over the call's threads (par), each thread applying the epilogue to its own
    rows while they are in cache (one serial numba pass for gelu etc. or with a residual).
    residual: float32 [N, out] (torch layout) or None. ln: None or (w, b, eps): then (act none)
    y2d = layernorm(x2d @ W.T + bias + residual) * w + b per row (w, b float32 [out] or empty)."""
    from . import par
    from .ops._common import EMPTY_F32, epilogue_rows

    npy = act in (0, 1, 2) and residual is None and ln is None
    n, work = x2d.shape[0], float(x2d.shape[0]) * W.shape[0] * W.shape[1]
    if npy:
        def epi(yp, b, rp):
            epilogue_rows(yp, b, act)
    elif ln is not None:
        from ..kernels.nn import bias_res_ln_rows

        def epi(yp, b, rp):
            bias_res_ln_rows(yp, EMPTY_F32 if b is None else b, _NO_RES if rp is None else rp, ln[0], ln[1],
                             float(ln[2]))
    else:
        from ..kernels.nn import bias_res_act_rows

        def epi(yp, b, rp):
            bias_res_act_rows(yp, EMPTY_F32 if b is None else b, _NO_RES if rp is None else rp, act, 0.0, 0.0)
    if n >= 32:
        def part(r0, r1):
            np.matmul(x2d[r0:r1], W.T, out=y2d[r0:r1])
            epi(y2d[r0:r1], bias, None if residual is None else residual[r0:r1])

        par.split(n, part, work)
    else:
        def part(o0, o1):
            np.matmul(x2d, W[o0:o1].T, out=y2d[:, o0:o1])
            if npy:
                epi(y2d[:, o0:o1], None if bias is None else bias[o0:o1], None)

        par.split(W.shape[0], part, work)
        if not npy:
            epi(y2d, bias, residual)


_NO_RES = np.zeros((0, 0), dtype=np.float32)  # writable like arena residuals: one specialization


def _scipy_prep(wf):
    import scipy.sparse as sp

    a = wf.arrays()
    return sp.csr_matrix((a["data"], a["indices"].astype(np.int32, copy=False), a["indptr"]), shape=wf.shape)


def _scipy_run(M, x, y, bias, act, lo, hi, residual):
    y[...] = M @ x
    _epi(y, bias, act, residual)


NUMPY_DENSE = Candidate("numpy_dense", "builtin", _dense2d, _dense_run, _dense_run_tl,
                        notes="numpy BLAS on the mapped dense weight")
NUMPY_DENSIFIED = Candidate("numpy_densified", "builtin", _dense2d, _dense_run, _dense_run_tl,
                            notes="weights densified (dequantized) once at load: a copy")
SCIPY_CSR = Candidate("scipy_csr", "builtin", _scipy_prep, _scipy_run, notes="scipy.sparse CSR")
BUILTINS = {c.name: c for c in (NUMPY_DENSE, NUMPY_DENSIFIED, SCIPY_CSR)}


def _table_rows():
    try:
        from ..kernels.table import all_kernels

        return all_kernels()
    except Exception:  # a kernel module failing to import must not take the runtime down
        import traceback
        import warnings

        warnings.warn("sparsedge: kernel table failed to import, using numpy paths:\n" + traceback.format_exc())
        return []


def _cpu_has(feat) -> bool:
    try:
        from ..kernels import cpu

        return cpu.has(feat)
    except Exception:
        return False


def cpu_name() -> str:
    try:
        from ..kernels import cpu

        info = cpu.cpu_info()
        return f"{info['arch']}:{info['name']}"
    except Exception:
        import platform

        return platform.machine()


def _wrap_row(r) -> Candidate:
    prep = r.prepare if r.prepare is not None else (lambda wf: wf)
    return Candidate(r.name, "table", prep, r.run, None, r, r.notes)


class Selector:
    """Chooses (and caches) a kernel per (layer, N). Thread-safe."""

    def __init__(self, model_path=None, overrides=None, tune=False, threads=1, act_quant=None):
        self.model_path = model_path
        self.overrides = dict(overrides or {})
        self.tune = bool(tune)
        self.threads = threads
        self.act_quant = dict(act_quant or {})
        self._rows = None
        self._lock = threading.RLock()
        self._choices: dict = {}  # (node, N) -> Choice
        self._packed: dict = {}  # (node, kernel) -> packed
        self._layers: dict = {}  # node -> (op, facts)
        self._wfs: dict = {}  # node -> weight format object
        self.prep_ms: dict = {}  # (node, kernel) -> ms spent in prepare
        self.tune_path = tune_path(model_path) if model_path else None
        self._tuned = load_tune_file(self.tune_path, self.tune_key()) if self.tune_path else {}
        self._dirty = False

    # -- candidates ---------------------------------------------------------------------------
    @property
    def rows(self):
        if self._rows is None:
            self._rows = _table_rows()
        return self._rows

    def tune_key(self) -> str:
        import numba

        return f"{cpu_name()}|numba {numba.__version__}|threads {self.threads}"

    def candidates(self, wf, N: int) -> list:
        f = weight_facts(wf)
        out = []
        for r in self.rows:
            if r.op not in ("gemm", "gemv") or r.fmt != f["kind"] or r.dtype != f["dtype"]:
                continue
            if r.block is not None and f["block"] is not None and tuple(r.block) != f["block"]:
                continue
            if (r.block is None) != (f["block"] is None) and f["kind"] in ("bsr", "bsr_i8", "nm"):
                continue
            if not all(_cpu_has(c) for c in r.cpu):
                continue
            if N < r.min_n or (r.max_n is not None and N > r.max_n):
                continue
            out.append(_wrap_row(r))
        if f["kind"] == "dense" and f["dtype"] == "float32":
            out.append(NUMPY_DENSE)
        else:
            if f["kind"] == "csr":
                out.append(SCIPY_CSR)
            out.append(NUMPY_DENSIFIED)
        return out

    def _rule(self, cands, f, N):
        table = [c for c in cands if c.kind == "table"]
        if f["kind"] == "dense" and f["dtype"] == "float32":
            return NUMPY_DENSE, "dense float32: numpy BLAS on the mapped weights"
        if not table:
            b = cands[0]
            return b, (f"no kernel row for format {f['kind']} {f['dtype']}"
                       f"{' block ' + 'x'.join(map(str, f['block'])) if f['block'] else ''} at N={N}: "
                       f"built-in {b.name}")
        if N == 1:
            gemv = [c for c in table if c.spec.max_n == 1]
            if gemv:
                return gemv[0], "N=1: batch-1 (memory-bound) gemv row"
        feat = [c for c in table if c.spec.cpu]
        if feat:
            return feat[0], f"CPU has {', '.join(feat[0].spec.cpu)}: specialised row"
        return table[0], f"first {f['kind']} {f['dtype']} row for N={N}"

    # -- choose -------------------------------------------------------------------------------
    def choose(self, node: str, op: str, wf, N: int) -> Choice:
        key = (node, int(N))
        with self._lock:
            ch = self._choices.get(key)
            if ch is not None:
                return ch
            f = weight_facts(wf)
            self._layers[node] = (op, f)
            self._wfs[node] = wf
            cands = self.candidates(wf, N)
            by = {c.name: c for c in cands}
            times = {}
            if node in self.overrides:
                want = self.overrides[node]
                if want not in by:
                    raise InputError(f"kernel {want!r} cannot run this layer ({f['kind']} {f['dtype']}, N={N}); "
                                     f"candidates: {sorted(by)}", node=node, field="kernel_overrides")
                cand, why = by[want], "forced by kernel_overrides"
            else:
                tk = f"{node}|N={N}"
                cached = self._tuned.get(tk)
                if self.tune and not (cached and cached.get("kernel") in by):
                    cand, times = self._measure(node, wf, N, cands)
                    n_sel = len([k for k in times if k != "dense_blas_equivalent"])
                    why = f"tuned: fastest of {n_sel} measured"
                    self._tuned[tk] = {"kernel": cand.name, "times_ms": times}
                    self._dirty = True
                elif cached and cached.get("kernel") in by:
                    cand, times = by[cached["kernel"]], dict(cached.get("times_ms", {}))
                    why = "tuned on this board (cached in " + os.path.basename(self.tune_path) + ")"
                else:
                    cand, why = self._rule(cands, f, N)
            packed = self.packed(node, cand, wf)
            ch = Choice(cand, packed, why, times)
            self._choices[key] = ch
            return ch

    def peek(self, node: str, op: str, wf, N: int) -> str:
        """The kernel name ``choose`` would pick for (node, N) without measuring, packing or
        recording anything (an override, a cached tuned choice, else the rules)."""
        with self._lock:
            ch = self._choices.get((node, int(N)))
            if ch is not None:
                return ch.cand.name
            cands = self.candidates(wf, N)
            by = {c.name: c for c in cands}
            if node in self.overrides and self.overrides[node] in by:
                return self.overrides[node]
            cached = self._tuned.get(f"{node}|N={N}")
            if cached and cached.get("kernel") in by:
                return cached["kernel"]
            return self._rule(cands, weight_facts(wf), N)[0].name

    def record(self, node: str, op: str, wf, N: int, kernel: str, why: str) -> None:
        """Report a layer whose kernel is fixed by its op (depthwise / grouped conv) and not selected."""
        with self._lock:
            if (node, int(N)) not in self._choices:
                self._layers[node] = (op, weight_facts(wf))
                self._wfs[node] = wf
                self._choices[(node, int(N))] = Choice(Candidate(kernel, "fixed", None, None), None, why)

    def packed(self, node, cand, wf):
        k = (node, cand.name)
        with self._lock:
            if k not in self._packed:
                t0 = time.perf_counter()
                p = cand.prepare(wf)
                aq = self.act_quant.get(node)
                if aq is not None and cand.kind == "table":
                    p = _apply_act_quant(cand, p, aq)
                self._packed[k] = p
                self.prep_ms[k] = (time.perf_counter() - t0) * 1e3
            return self._packed[k]

    # -- tuning -------------------------------------------------------------------------------
    def _measure(self, node, wf, N, cands):
        """Time every selectable candidate (and the dense BLAS equivalent) on random activations of
        the layer's real shape: one warm-up call each (compilation / cache load excluded), then
        interleaved rounds (every candidate once per round, so machine noise hits all alike) until
        5 rounds and 0.3 s have passed; each candidate's time is its fastest round."""
        f = weight_facts(wf)
        out_f, in_f = f["shape"]
        rng = np.random.default_rng(0)
        x = rng.standard_normal((in_f, N)).astype(np.float32)
        y = np.empty((out_f, N), np.float32)
        fns = {}
        self.errors = getattr(self, "errors", {})
        for c in cands:
            if c.name == "numpy_densified" and len(cands) > 1:
                continue  # a copy of the weights; only a fallback
            try:
                p = self.packed(node, c, wf)
                fn = (lambda c=c, p=p: c.run(p, x, y, None, 0, 0.0, 0.0, None))
                fn()
                fns[c.name] = fn
            except Exception as e:  # a broken candidate is reported, never chosen
                self.errors[(node, c.name)] = repr(e)
        W = None
        if not (f["kind"] == "dense" and f["dtype"] == "float32"):
            W = _dense2d(wf)
            fns["dense_blas_equivalent"] = lambda: np.matmul(W, x, out=y)
            fns["dense_blas_equivalent"]()
        best_t = {k: float("inf") for k in fns}
        t_end = time.perf_counter() + 0.3
        rounds = 0
        while rounds < 5 or (time.perf_counter() < t_end and rounds < 50):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best_t[k] = min(best_t[k], time.perf_counter() - t0)
            rounds += 1
        times = {k: round(v * 1e3, 4) for k, v in best_t.items()}
        for (nd, name), err in self.errors.items():
            if nd == node:
                times[name] = float("nan")
        sel = {k: v for k, v in times.items() if k != "dense_blas_equivalent" and v == v}
        best = min(sel, key=sel.get) if sel else cands[0].name
        return {c.name: c for c in cands}[best], times

    def save(self):
        if self._dirty and self.tune_path:
            save_tune_file(self.tune_path, self.tune_key(), self._tuned, self.model_path)
            self._dirty = False

    # -- report -------------------------------------------------------------------------------
    def report(self) -> list:
        rows = []
        with self._lock:
            for (node, N), ch in sorted(self._choices.items(), key=lambda kv: (list(self._layers).index(kv[0][0]), kv[0][1])):
                op, f = self._layers[node]
                t = dict(ch.times_ms)
                dense_t = t.get("dense_blas_equivalent")
                chosen_t = t.get(ch.name)
                rows.append({
                    "node": node, "op": op, "format": f["kind"] + (f" {'x'.join(map(str, f['block']))}" if f["block"] else ""),
                    "dtype": f["dtype"], "shape": list(f["shape"]), "sparsity": round(1.0 - f["density"], 4), "N": N,
                    "kernel": ch.name, "why": ch.why, "measured_ms": t,
                    "speedup_vs_dense": (round(dense_t / chosen_t, 2) if dense_t and chosen_t else None),
                    "prepare_ms": round(self.prep_ms.get((node, ch.name), 0.0), 3),
                    **packing_facts(self._wfs.get(node), ch.packed),
                })
        return rows


def _arrays_in(obj, depth=0):
    if isinstance(obj, np.ndarray):
        yield obj
    elif depth < 3 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _arrays_in(o, depth + 1)
    elif depth < 3 and isinstance(obj, dict):
        for o in obj.values():
            yield from _arrays_in(o, depth + 1)
    elif depth < 3 and hasattr(obj, "data") and hasattr(obj, "indices"):  # scipy.sparse
        yield from (obj.data, obj.indices, obj.indptr)


def packing_facts(wf, packed) -> dict:
    """Whether the kernel reads the file's mapped arrays (zero copy) and how many bytes it repacked."""
    if isinstance(wf, np.ndarray) or packed is None:
        return {"zero_copy": None, "repack_bytes": 0}
    try:
        file_arrays = list(wf.arrays().values())
    except Exception:
        return {"zero_copy": None, "repack_bytes": 0}
    used = list(_arrays_in(packed))
    mapped = [a for a in used if any(np.may_share_memory(a, f) for f in file_arrays)]
    own = sum(a.nbytes for a in used if not any(np.may_share_memory(a, f) for f in file_arrays))
    if isinstance(packed, dict) and "repack_bytes" in packed:
        own = int(packed["repack_bytes"])
    return {"zero_copy": bool(mapped) and own == 0, "repack_bytes": int(own)}


def _apply_act_quant(cand, packed, aq):
    import importlib

    mod = importlib.import_module(cand.run.__module__)
    fn = getattr(mod, "set_act_quant", None)
    if fn is None or not isinstance(packed, dict):
        return packed
    return fn(packed, aq["scale"], aq["zero_point"], aq.get("dtype", "int8"))


def tune_path(model_path) -> str:
    p = os.fspath(model_path)
    base, ext = os.path.splitext(p)
    return (base if ext == ".sparsedge" else p) + ".tune.json"


def format_report(rows: list) -> str:
    """Human-readable selection report."""
    if not rows:
        return "no weight layers planned yet (run the model or call output_shapes/planned_peak_bytes first)"
    lines = [f"{'node':<28} {'op':<7} {'format':<10} {'dtype':<7} {'sparsity':>8} {'N':>6}  {'kernel':<22} "
             f"{'ms':>8} {'dense ms':>9} {'speedup':>7}  {'weights':<13} why"]
    for r in rows:
        t = r["measured_ms"]
        ms = t.get(r["kernel"])
        d = t.get("dense_blas_equivalent")
        sp = r["speedup_vs_dense"]
        wts = ("mapped" if r.get("zero_copy") else
               f"+{r.get('repack_bytes', 0) / 1024:.0f} KB packed" if r.get("zero_copy") is False else "")
        lines.append(f"{r['node'][:28]:<28} {r['op']:<7} {r['format']:<10} {r['dtype']:<7} {r['sparsity']:>8.1%} "
                     f"{r['N']:>6}  {r['kernel'][:22]:<22} {'' if ms is None else f'{ms:.3f}':>8} "
                     f"{'' if d is None else f'{d:.3f}':>9} {'' if sp is None else f'{sp:.2f}x':>7}  {wts:<13} {r['why']}")
        alts = {k: v for k, v in t.items() if k not in (r["kernel"], "dense_blas_equivalent")}
        if alts:
            lines.append(" " * 30 + "alternatives: " + ", ".join(f"{k} {v:.3f} ms" for k, v in sorted(alts.items(), key=lambda kv: kv[1])))
    tuned = [r for r in rows if r["speedup_vs_dense"] is not None]
    if tuned:
        pays = sum(1 for r in tuned if r["speedup_vs_dense"] > 1.0)
        lines.append(f"sparsity/quantization pays on this board for {pays} of {len(tuned)} compressed layers "
                     f"(speedup = dense float32 BLAS time / chosen kernel time, each layer timed alone with its "
                     f"weights hot in cache; in a whole model at batch 1 weights stream from DRAM, where "
                     f"fewer bytes per weight gain more).")
    else:
        lines.append("no measurements: pass tune=True (or run `sparsedge tune MODEL`) to time the alternatives.")
    return "\n".join(lines)


# --- MODEL.tune.json ------------------------------------------------------------------------
# {"version": 1, "model": {"size", "mtime_ns"}, "entries": {key: {"node|N=n": {"kernel", "times_ms"}}}}
# Entries written for a different model file (size / mtime) are ignored. Written atomically.


def _fingerprint(model_path):
    try:
        st = os.stat(model_path)
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    except OSError:
        return None


def load_tune_file(path, key) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(d, dict) or d.get("version") != 1:
        return {}
    base = path[: -len(".tune.json")]
    model = base + ".sparsedge" if os.path.exists(base + ".sparsedge") else base
    if d.get("model") != _fingerprint(model):
        return {}
    e = d.get("entries", {}).get(key, {})
    return dict(e) if isinstance(e, dict) else {}


def save_tune_file(path, key, entries, model_path):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("model") != _fingerprint(model_path):
            d = {}
    except (OSError, ValueError):
        d = {}
    d = {"version": 1, "model": _fingerprint(model_path), "entries": dict(d.get("entries", {}))}
    d["entries"][key] = entries
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1, sort_keys=True)
