"""The kernel suite: every GEMM/GEMV row of ``kernels.table.all_kernels()`` on the shapes and
sparsities of the kernels issue, side by side with the peers (``bench/peers.py``) in one run.

Shapes (``SHAPES``; W ``[out, in]`` times X ``[in, N]``):
  ffn_n128     3072x768, N=128           (a BERT-base FFN matrix, a batch of tokens)
  ffn_n1       3072x768, N=1             (batch 1, weights hot in cache)
  ffn_n1_dram  3072x768, N=1, a pool of distinct weight matrices larger than the cache, cycled
               (every implementation cycles its own pool of the same matrices: a model whose
               dense weights do not fit in the last-level cache)
  conv1x1      256x256, N=3136           (a 1x1 conv on 56x56)
  sq1024_n32   1024x1024, N=32
  conv3x3      64->64 3x3 on 1x64x56x56, stride 1, pad 1: W 64x576 times the im2col matrix
               576x3136. GEMM rows and numpy / scipy include the same numpy im2col; torch and
               onnxruntime run their own Conv on NCHW.
Weight patterns per shape (a *group*; all members timed interleaved, ``bench/timing.py``):
  dense (s=0): dense rows (float32 BLAS, int8), and low-rank rows (rank giving 10% of the
  parameters) in their own group ``lr``; unstructured ``u50 u70 u80 u90 u95``: CSR rows (float32
  and int8); blocks ``b90_RxC``: BSR rows of that block; N:M
  ``nmNofM``: N:M rows. Random N(0, 1/in) values, random exact-count masks (seed 0).
Each kernel's output is checked once against ``W @ X`` (relative max error recorded; int8 rows
quantize activations, so their error is about 1e-2). Cases record median time, GFLOP/s of useful
work (2 x nnz x N / time), fraction of the measured FMA peak, and ratios to numpy dense and to
the best installed peer of the same group.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from . import peers as P
from .peers import aligned_empty
from .timing import interleaved

UNSTRUCTURED = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCK_SPARSITIES_FULL = (0.9,)  # the block case; add 0.8 / 0.95 here for plots
QUICK_BLOCK = (8, 1)


@dataclass(frozen=True)
class Shape:
    id: str
    out: int
    inp: int
    n: int
    pool: bool = False  # DRAM-streamed pool
    conv3x3: bool = False
    label: str = ""


SHAPES = [
    Shape("ffn_n128", 3072, 768, 128, label="W 3072x768, N=128"),
    Shape("ffn_n1", 3072, 768, 1, label="W 3072x768, N=1 (hot)"),
    Shape("ffn_n1_dram", 3072, 768, 1, pool=True, label="W 3072x768, N=1, DRAM-streamed pool"),
    Shape("conv1x1", 256, 256, 3136, label="W 256x256, N=3136 (1x1 conv 56x56)"),
    Shape("sq1024_n32", 1024, 1024, 32, label="W 1024x1024, N=32"),
    Shape("conv3x3", 64, 576, 3136, conv3x3=True, label="3x3 conv 64->64 on 56x56 (im2col 64x576, N=3136)"),
]
SHAPE_BY_ID = {s.id: s for s in SHAPES}


# ---------------------------------------------------------------------------------------------
# weights
def make_weight(rng, out, inp, pattern: dict) -> np.ndarray:
    """A float32 ``[out, in]`` matrix with the given pattern (exact non-zero counts)."""
    w = (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)
    kind = pattern["structure"]
    if kind == "dense" or kind == "lowrank":
        return w
    if kind == "unstructured":
        keep = int(round((1 - pattern["sparsity"]) * w.size))
        mask = np.zeros(w.size, bool)
        mask[rng.permutation(w.size)[:keep]] = True
        return np.where(mask.reshape(w.shape), w, 0).astype(np.float32)
    if kind == "block":
        r, c = pattern["block"]
        br, bc = -(-out // r), -(-inp // c)
        keep = int(round((1 - pattern["sparsity"]) * br * bc))
        bm = np.zeros(br * bc, bool)
        bm[rng.permutation(br * bc)[:keep]] = True
        m = np.repeat(np.repeat(bm.reshape(br, bc), r, 0), c, 1)[:out, :inp]
        return np.where(m, w, 0).astype(np.float32)
    if kind == "nm":
        n, m = pattern["nm"]
        g = -(-inp // m)
        pad = np.zeros((out, g * m), np.float32)
        pad[:, :inp] = w
        pr = rng.random((out, g, m))
        pr.reshape(out, -1)[:, inp:] = 2.0  # never keep padding columns
        order = np.argsort(pr, axis=2)
        mask = np.zeros((out, g, m), bool)
        np.put_along_axis(mask, order[:, :, :n], True, axis=2)
        return np.where(mask.reshape(out, -1), pad, 0)[:, :inp].astype(np.float32)
    raise ValueError(kind)


def make_format(spec, w: np.ndarray, pattern: dict, name="W"):
    """The weight-format object of ``spec.fmt`` holding ``w`` (exactly its non-zeros)."""
    from sparsedge.formats import FORMATS

    cls = FORMATS[spec.fmt]
    opts = {}
    if spec.fmt in ("bsr", "bsr_i8"):
        opts["block"] = tuple(spec.block)
    elif spec.fmt == "nm":
        opts["n"], opts["m"] = spec.block
    elif spec.fmt == "lowrank":
        # randomized range finder (cheap) instead of a full SVD per pool matrix: the timing only
        # depends on the factor shapes [out, k] and [k, in]
        k = int(pattern["rank"])
        g = np.random.default_rng(k).standard_normal((w.shape[1], k)).astype(np.float32)
        q, _ = np.linalg.qr(w @ g)
        return cls.from_factors(q.astype(np.float32), (q.T @ w).astype(np.float32),
                                dtype="int8" if spec.dtype == "int8" else "float32", name=name)
    elif spec.fmt == "dense":
        pass
    return cls.from_dense(w, name=name, **opts)


def lowrank_rank(out, inp, frac=0.1):
    return max(1, int(round(frac * out * inp / (out + inp))))


# ---------------------------------------------------------------------------------------------
def _patterns_for(spec, quick: bool, shape: Shape) -> list[dict]:
    f = spec.fmt
    if f in ("dense", "dense_i8"):
        return [{"id": "dense", "structure": "dense", "sparsity": 0.0}]
    if f == "lowrank":
        r = lowrank_rank(shape.out, shape.inp)
        return [{"id": f"lr{r}", "structure": "lowrank", "rank": r,
                 "sparsity": round(1 - r * (shape.out + shape.inp) / (shape.out * shape.inp), 4)}]
    if f in ("csr", "csr_i8"):
        ss = (0.9,) if quick else UNSTRUCTURED
        return [{"id": f"u{int(round(s * 100))}", "structure": "unstructured", "sparsity": s} for s in ss]
    if f in ("bsr", "bsr_i8"):
        r, c = spec.block
        ss = (0.9,) if quick else BLOCK_SPARSITIES_FULL
        return [{"id": f"b{int(round(s * 100))}_{r}x{c}", "structure": "block", "block": [r, c], "sparsity": s}
                for s in ss]
    if f == "nm":
        n, m = spec.block
        return [{"id": f"nm{n}of{m}", "structure": "nm", "nm": [n, m], "sparsity": round(1 - n / m, 4)}]
    return []


def _cpu_ok(spec) -> bool:
    if not spec.cpu:
        return True
    try:
        from sparsedge.kernels import cpu

        return all(cpu.has(f) for f in spec.cpu)
    except Exception:
        return False


def select_rows(quick: bool, kernel_filter: str | None = None):
    """(rows to run, skipped [(name, reason)]). Quick mode: one row per (op, format, dtype)
    family, preferring the one a CPU-feature-specific path provides, BSR 8x1 for BSR."""
    from sparsedge.kernels.table import all_kernels

    rows, skipped = [], []
    for s in all_kernels():
        if kernel_filter and kernel_filter not in s.name:
            continue
        if s.op not in ("gemm", "gemv"):
            skipped.append((s.name, f"op {s.op!r} is not in the GEMM suite"))
        elif s.run is None or s.prepare is None:
            skipped.append((s.name, "row has no run/prepare"))
        elif not _cpu_ok(s):
            skipped.append((s.name, f"CPU lacks {'/'.join(s.cpu)}"))
        else:
            rows.append(s)
    if quick:
        fam: dict = {}
        for s in rows:
            key = (s.op, s.fmt, s.dtype)
            cur = fam.get(key)
            score = (1 if s.fmt in ("bsr", "bsr_i8") and tuple(s.block or ()) == QUICK_BLOCK else 0,
                     len(s.cpu))
            if cur is None or score > cur[0]:
                fam[key] = (score, s)
        keep = {id(v[1]) for v in fam.values()}
        for s in rows:
            if id(s) not in keep:
                skipped.append((s.name, "quick mode: one row per family"))
        rows = [s for s in rows if id(s) in keep]
    return rows, skipped


def _n_ok(spec, n):
    return n >= spec.min_n and (spec.max_n is None or n <= spec.max_n)


def _im2col_fn(x4, k=3):
    pad = k // 2
    b, ci, h, wd = x4.shape
    xb = np.pad(x4, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = aligned_empty((ci * k * k, b * h * wd))

    def im2col():
        v = np.lib.stride_tricks.sliding_window_view(xb, (k, k), axis=(2, 3))
        cols.reshape(ci, k, k, b, h, wd)[...] = v.transpose(1, 4, 5, 0, 2, 3)
        return cols
    return im2col


def _cycler(items):
    st = [0]
    n = len(items)

    def nxt():
        i = st[0]
        st[0] = i + 1 if i + 1 < n else 0
        return items[i]
    return nxt


def run_suite(*, quick=False, threads=None, shapes=None, kernel_filter=None, budget=None, peers_filter=None,
              dram_pool_mb=128, peak_gflops=None, log=print, seed=0) -> dict:
    """Run the kernel suite. Returns ``{"cases": [...], "skipped": [...], "settings": {...}}``."""
    import numba

    threads = int(threads or numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    rows, skipped = select_rows(quick, kernel_filter)
    if shapes is None:
        shapes = ["ffn_n128", "ffn_n1"] if quick else [s.id for s in SHAPES]
    budget = budget if budget is not None else (0.6 if quick else 3.0)
    min_rounds = 3 if quick else 7
    rng = np.random.default_rng(seed)
    cases: list[dict] = []
    wd = os_tmp = None
    import tempfile

    os_tmp = tempfile.TemporaryDirectory(prefix="sparsedge-bench-")
    wd = os_tmp.name
    t_start = time.perf_counter()
    try:
        for sid in shapes:
            shape = SHAPE_BY_ID[sid]
            applicable = [s for s in rows if _n_ok(s, shape.n)]
            if quick and shape.n == 1:  # quick: batch-1 shapes only for the batch-1 rows
                applicable = [s for s in applicable if s.max_n == 1]
            groups: dict = {}
            for s in applicable:
                for pat in _patterns_for(s, quick, shape):
                    groups.setdefault(pat["id"], (pat, []))[1].append(s)
            pool_len = 1
            if shape.pool:
                pool_len = max(2, int(math.ceil(dram_pool_mb * 2 ** 20 / (shape.out * shape.inp * 4))))
            for gid, (pat, specs) in groups.items():
                t_g = time.perf_counter()
                cases.extend(_run_group(shape, pat, specs, rng, threads, pool_len, budget, min_rounds,
                                        peers_filter, wd, peak_gflops, log))
                log(f"  [{time.perf_counter() - t_start:6.1f}s] {shape.id}/{gid}: {len(specs)} kernels "
                    f"({time.perf_counter() - t_g:.1f}s)")
    finally:
        os_tmp.cleanup()
    return {"cases": cases, "skipped": [{"kernel": n, "reason": r} for n, r in skipped],
            "settings": {"threads": threads, "quick": quick, "budget_s": budget, "min_rounds": min_rounds,
                         "shapes": shapes, "dram_pool_mb": dram_pool_mb, "seed": seed}}


def _run_group(shape, pat, specs, rng, threads, pool_len, budget, min_rounds, peers_filter, wd, peak, log):
    weights = [make_weight(rng, shape.out, shape.inp, pat) for _ in range(pool_len)]
    sparse = pat["structure"] in ("unstructured", "block", "nm")
    if shape.conv3x3:
        x4 = rng.standard_normal((1, 64, 56, 56)).astype(np.float32)
        im2col = _im2col_fn(x4)
        x = im2col()
    else:
        # X as the runtime's arena hands it over (64-byte aligned), the same array for every implementation
        x = aligned_empty((shape.inp, shape.n))
        x[...] = rng.standard_normal((shape.inp, shape.n))
        im2col = None
    w0 = weights[0]
    nnz = int(np.count_nonzero(w0))
    fns: dict = {}
    meta: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.getLogger().setLevel(logging.ERROR)
        try:
            if shape.conv3x3:
                pf = P.conv_peers(w0.reshape(64, 64, 3, 3), x4, threads, sparse=sparse, which=peers_filter, workdir=wd)
            else:
                pf = P.gemm_peers(weights, x, threads, sparse=sparse, which=peers_filter, workdir=wd)
        except Exception as e:  # a broken peer must not kill the suite
            log(f"    peers failed: {type(e).__name__}: {e}")
            pf = P.gemm_peers(weights, x, threads, sparse=sparse, which=("numpy_dense",))
    for name, f in pf.items():
        fns[name] = f
        meta[name] = {"kind": "peer"}
    ref = w0 @ x
    for s in specs:
        try:
            t0 = time.perf_counter()
            wfs = [make_format(s, w, pat) for w in weights]
            t1 = time.perf_counter()
            packed = [s.prepare(wf) for wf in wfs]
            t2 = time.perf_counter()
            y = aligned_empty((shape.out, x.shape[1]))  # the arena's alignment, like x
            y[...] = 0
            s.run(packed[0], x, y, None, 0, 0.0, 0.0, None)  # compile (or load from cache)
            t3 = time.perf_counter()
            err = float(np.max(np.abs(y - ref)) / max(float(np.max(np.abs(ref))), 1e-30))
            # int8 rows quantize activations too: relative error about 1e-2
            tol = 6e-2 if s.dtype == "int8" or s.fmt == "lowrank" else 1e-3
            if s.fmt == "lowrank":
                lr_ref = wfs[0].to_dense() @ x
                err = float(np.max(np.abs(y - lr_ref)) / max(float(np.max(np.abs(lr_ref))), 1e-30))
        except Exception as e:
            log(f"    {s.name}: failed: {type(e).__name__}: {e}")
            meta[s.name] = {"kind": "sparsedge", "error": f"{type(e).__name__}: {e}", "spec": s}
            continue
        nxt = _cycler(packed)
        run = s.run
        if im2col is not None:
            def f(run=run, nxt=nxt, y=y):
                run(nxt(), im2col(), y, None, 0, 0.0, 0.0, None)
        else:
            def f(run=run, nxt=nxt, y=y):
                run(nxt(), x, y, None, 0, 0.0, 0.0, None)
        fns[s.name] = f
        meta[s.name] = {"kind": "sparsedge", "spec": s, "max_rel_err": err, "ok": err <= tol,
                        "weight_bytes": int(wfs[0].nbytes), "convert_s": (t1 - t0) / len(wfs),
                        "prepare_s": (t2 - t1) / len(wfs), "first_call_s": t3 - t2}
    timed = interleaved(fns, budget=budget, min_rounds=min_rounds, rounds=25)
    peer_t = {n: timed[n]["median"] for n in timed if meta[n]["kind"] == "peer"}
    base = peer_t.get("numpy_dense")
    best_name = min(peer_t, key=peer_t.get) if peer_t else None
    out = []
    dense_flops = 2.0 * shape.out * shape.inp * x.shape[1]
    for name, m in meta.items():
        spec = m.get("spec")
        c = {"suite": "kernels", "id": f"kernels/{shape.id}/{pat['id']}/{name}", "group": f"{shape.id}/{pat['id']}",
             "shape_id": shape.id, "shape": {"out": shape.out, "in": shape.inp, "n": int(x.shape[1]),
                                             "pool": len(weights)},
             "impl": name, "kind": m["kind"], "pattern": pat["id"], "structure": pat["structure"],
             "sparsity": float(pat["sparsity"]), "threads": threads}
        if spec is not None:
            c.update({"fmt": spec.fmt, "dtype": spec.dtype, "op": spec.op,
                      "block": list(spec.block) if spec.block else None, "cpu": list(spec.cpu)})
        else:
            c.update({"fmt": "dense" if name not in P.SPARSE_ONLY else "csr",
                      "dtype": "int8" if name == "ort_int8" else "float32", "op": "gemm", "block": None})
        if "error" in m:
            c["error"] = m["error"]
            out.append(c)
            continue
        st = timed[name]
        med = st["median"]
        if pat["structure"] == "lowrank":
            useful = 2.0 * pat["rank"] * (shape.out + shape.inp) * x.shape[1]
        elif m["kind"] == "peer" and not (sparse and name in P.SPARSE_ONLY):
            useful = dense_flops if not sparse else 2.0 * nnz * x.shape[1]
        else:
            useful = 2.0 * nnz * x.shape[1]
        c.update({"time_s": st, "median_s": med, "useful_gflops": useful / med / 1e9,
                  "ratio_numpy_dense": (base / med) if base else None,
                  "best_peer": best_name, "ratio_best_peer": (peer_t[best_name] / med) if best_name else None})
        if peak:
            c["peak_fraction"] = useful / med / 1e9 / peak
        for k in ("max_rel_err", "ok", "weight_bytes", "convert_s", "prepare_s", "first_call_s"):
            if k in m:
                c[k] = m[k]
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# cold start: compile with an empty numba cache, then load with the warm one, per kernel
_COLD_SCRIPT = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import numba
from sparsedge.kernels.table import by_name
from sparsedge.bench.kernels import make_weight, make_format, _patterns_for, SHAPE_BY_ID
t_import = time.perf_counter() - t0
names = sys.argv[1].split(",")
out = {"import_s": t_import, "kernels": {}}
rng = np.random.default_rng(0)
shape = SHAPE_BY_ID["sq1024_n32"]
for name in names:
    s = by_name(name)
    pat = _patterns_for(s, True, shape)[0]
    w = make_weight(rng, 64, 96, pat)
    n = 1 if s.max_n == 1 else 8
    x = rng.standard_normal((96, n)).astype(np.float32)
    y = np.zeros((64, n), np.float32)
    wf = make_format(s, w, pat)
    t1 = time.perf_counter()
    p = s.prepare(wf)
    s.run(p, x, y, None, 0, 0.0, 0.0, None)
    out["kernels"][name] = time.perf_counter() - t1
out["total_s"] = time.perf_counter() - t0
print("@@COLD@@" + json.dumps(out))
"""


def cold_start(names: list[str], threads=None, log=print) -> list[dict]:
    """Per kernel: first-call time with an empty numba cache (compile) and, in a second new
    process, with the warm cache (load). Each in a subprocess with its own NUMBA_CACHE_DIR."""
    import json
    import subprocess
    import sys
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory(prefix="sparsedge-cold-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        if threads:
            env["NUMBA_NUM_THREADS"] = str(threads)
        for phase in ("compile", "load"):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _COLD_SCRIPT, ",".join(names)], env=env,
                               capture_output=True, text=True, timeout=1800)
            wall = time.perf_counter() - t0
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("@@COLD@@")]
            if r.returncode != 0 or not line:
                log(f"  cold start ({phase}) failed: {r.stderr.strip().splitlines()[-1:] if r.stderr else r.returncode}")
                res[phase] = None
                continue
            d = json.loads(line[0][len("@@COLD@@"):])
            d["process_wall_s"] = wall
            res[phase] = d
            log(f"  cold start {phase}: {len(names)} kernels, {d['total_s']:.2f}s in process "
                f"(imports {d['import_s']:.2f}s), {wall:.2f}s wall")
    cases = []
    for phase in ("compile", "load"):
        d = res.get(phase)
        if d is None:
            cases.append({"suite": "coldstart", "id": f"coldstart/{phase}/all", "impl": "all", "kind": "sparsedge",
                          "phase": phase, "error": "subprocess failed"})
            continue
        for name, t in d["kernels"].items():
            cases.append({"suite": "coldstart", "id": f"coldstart/{phase}/{name}", "impl": name,
                          "kind": "sparsedge", "phase": phase, "median_s": t})
        cases.append({"suite": "coldstart", "id": f"coldstart/{phase}/all", "impl": "all", "kind": "sparsedge",
                      "phase": phase, "median_s": d["total_s"], "import_s": d["import_s"],
                      "process_wall_s": d["process_wall_s"], "n_kernels": len(d["kernels"])})
    return cases
