"""Emulated-board check run by .ci/arm.sh under each core: every kernel row once, int8 outputs saved.

Numba compiles dominate under qemu (30-60 s of CPU per kernel), so this calls every kernel of
the kernel table exactly once with one argument signature (bias and residual given, so the
full fused epilogue runs), instead of the edge-shape sweeps of the unit tests:

  1. every float32 gemm/gemv row, and every portable int8 row (dense, csr, every bsr block;
     gemm and batch-1), on shapes that are not multiples of any tile or block, at 2 threads,
     each checked against the row's numpy reference;
  2. on aarch64: the int8 functions compiled in this process contain sdot iff the core has
     dotprod (numba cannot show cache-loaded code; then the check says so and is skipped);
  3. the runtime end to end: a small MLP model file (csr, dense_i8, bsr_i8 layers) through
     Session, against the reference interpreter, and 3 threads x 20 runs on one Session.

The int8 outputs go to OUT.npz: .ci/arm.sh requires them bit-identical across cores.
usage: python3 arm_check.py OUT.npz
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time

import numba
import numpy as np

from sparsedge.formats.bsr import BSR
from sparsedge.formats.csr import CSR
from sparsedge.formats.dense import Dense
from sparsedge.formats.lowrank import LowRank
from sparsedge.formats.nm import NM
from sparsedge.formats.quant import BSRI8, CSRI8, DenseI8
from sparsedge.kernels import cpu
from sparsedge.kernels.table import ACT_RELU, all_kernels

OUT, K = 37, 50  # not multiples of any block, tile or dot width
N_GEMM = 19


def weight(fmt, block, rng):
    """A weight of the row's format with ~30% non-zeros, an empty row, odd shape."""
    w = rng.standard_normal((OUT, K)).astype(np.float32)
    if fmt in ("dense_i8", "dense"):
        return DenseI8.from_dense(w, mode="affine", granularity="channel") if fmt == "dense_i8" else Dense.from_dense(w)
    if fmt == "lowrank":
        return LowRank.from_dense(w, rank=8)
    if fmt == "nm":
        n, m = block
        keep = np.zeros((OUT, -(-K // m) * m), bool)
        order = np.argsort(rng.random(keep.shape).reshape(OUT, -1, m), axis=2)[:, :, :n]
        np.put_along_axis(keep.reshape(OUT, -1, m), order, True, axis=2)
        w = w * keep[:, :K]
        w[3] = 0
        return NM.from_dense(w, n=n, m=m)
    w[rng.random(w.shape) < 0.7] = 0
    w[3] = 0  # an empty row
    if fmt == "csr":
        return CSR.from_dense(w)
    if fmt == "bsr":
        return BSR.from_dense(w, block=tuple(block))
    if fmt == "csr_i8":
        return CSRI8.from_dense(w)
    if fmt == "bsr_i8":
        return BSRI8.from_dense(w, block=tuple(block))
    raise ValueError(fmt)


def check_rows(info):
    rows = [r for r in all_kernels() if r.op in ("gemm", "gemv") and not r.cpu
            and (r.dtype == "float32" or r.dtype == "int8")]
    int8_out = {}
    for r in rows:
        rng = np.random.default_rng(1234)  # same weights and inputs for every row and core
        wf = weight(r.fmt, r.block, rng)
        n = 1 if r.max_n == 1 else N_GEMM
        x = (rng.standard_normal((K, n)) * 3).astype(np.float32)
        bias = rng.standard_normal(OUT).astype(np.float32)
        res = rng.standard_normal((OUT, n)).astype(np.float32)
        t0 = time.perf_counter()
        packed = r.prepare(wf)
        y = np.full((OUT, n), np.nan, np.float32)
        r.run(packed, x, y, bias, ACT_RELU, 0.0, 0.0, res)
        dt = time.perf_counter() - t0
        ref = r.reference(wf, x, bias, ACT_RELU, 0.0, 0.0, res)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * (1 + np.sqrt(K)), err_msg=r.name)
        if r.dtype == "int8":
            int8_out[r.name] = y
        print(f"  {r.name:<22} N={n:<3} {dt:7.2f} s (first call: compile or cache load)", flush=True)
    if not int8_out:
        raise SystemExit("no portable int8 kernel rows in the kernel table")
    return int8_out


def sdot_check(info):
    """On aarch64: int8 functions compiled here contain sdot iff the core has dotprod."""
    if info["arch"] != "aarch64":
        return
    from numba.core.registry import CPUDispatcher

    from sparsedge.kernels import int8 as k8

    fresh, with_sdot = [], []
    for name, obj in sorted(vars(k8).items()):
        if not isinstance(obj, CPUDispatcher) or not obj.signatures or sum(obj.stats.cache_hits.values()):
            continue
        fresh.append(name)
        if any(re.search(r"\bsdot\b", a) for a in obj.inspect_asm().values()):
            with_sdot.append(name)
    if not fresh:
        print("sdot check: every int8 function came from the numba cache; nothing to inspect")
        return
    print(f"sdot check ({info['name']}): {len(fresh)} int8 functions compiled here, with sdot: {with_sdot}")
    if "dotprod" in info["features"] and not with_sdot:
        raise SystemExit(f"{info['name']} has dotprod but no int8 kernel uses sdot")
    if "dotprod" not in info["features"] and with_sdot:
        raise SystemExit(f"{info['name']} lacks dotprod but {with_sdot} contain sdot")


def check_session():
    from sparsedge.formats.graph import Graph, Node, ValueInfo
    from sparsedge.formats.modelfile import read_model, write_model
    from sparsedge.runtime import Session
    from sparsedge.runtime.reference import run_reference

    rng = np.random.default_rng(7)
    d_in, hid, d_out = 24, 40, 10

    def w(o, i):
        a = (rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)
        a[rng.random(a.shape) < 0.6] = 0
        return a

    g = Graph([ValueInfo("x", "float32", ["batch", d_in])], [ValueInfo("y", "float32", ["batch", d_out])],
              [Node("linear", "fc1", ["x", "w1", "b1"], ["h1"], {"activation": "relu"}),
               Node("linear", "fc2", ["h1", "w2", "b2"], ["h2"], {"activation": "gelu"}),
               Node("linear", "fc3", ["h2", "w3"], ["y"], {})])
    t = {"w1": CSR.from_dense(w(hid, d_in)), "b1": Dense.from_dense(rng.standard_normal(hid).astype(np.float32)),
         "w2": DenseI8.from_dense(w(hid, hid)), "b2": Dense.from_dense(rng.standard_normal(hid).astype(np.float32)),
         "w3": BSRI8.from_dense(w(d_out, hid), block=(4, 1))}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "mlp.sparsedge")
        write_model(path, g, t)
        t0 = time.perf_counter()
        sess = Session(path, threads=2)
        xs = [rng.standard_normal((b, d_in)).astype(np.float32) for b in (1, 5)]
        want = [sess.run(None, {"x": x})[0] for x in xs]
        print(f"  Session: load + first runs {time.perf_counter() - t0:.1f} s; threading layer "
              f"{sess.threading_layer}; kernels {sorted({r['kernel'] for r in sess.selection_report()})}")
        model = read_model(path)
        for x, y in zip(xs, want):
            ref = run_reference(model, {"x": x})["y"]
            assert np.abs(y - ref).max() <= 0.05 * max(1.0, np.abs(ref).max()), (y, ref)
        errors = []

        def worker(k):
            for i in range(20):
                j = (k + i) % len(xs)
                if not np.array_equal(sess.run(None, {"x": xs[j]})[0], want[j]):
                    errors.append((k, i))

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        assert not errors, errors
        print("  Session: 3 threads x 20 runs identical to the single-threaded results")
        sess.close()


def main(path):
    info = cpu.cpu_info()
    print(f"cpu: {info['arch']} {info['name']} features={sorted(info['features'])} "
          f"numba threads={numba.get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    int8_out = check_rows(info)
    np.savez(path, **int8_out)
    print(f"kernel rows checked in {time.perf_counter() - t0:.1f} s; {len(int8_out)} int8 outputs -> {path}")
    sdot_check(info)
    t1 = time.perf_counter()
    check_session()
    print(f"runtime checked in {time.perf_counter() - t1:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
