"""Run every portable int8 kernel row of the kernel table on fixed inputs; save the outputs.

Used by .ci/arm.sh under each emulated core: the saved files of two cores (cortex-a53, no
dot-product; cortex-a76, sdot) must be bit-identical (issue 7). Each output is also checked
against the row's numpy reference here, so identical garbage cannot pass.

usage: python3 arm_int8_dump.py OUT.npz
Prints the CPU info the kernels saw and the time per row.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from sparsedge.formats.quant import BSRI8, CSRI8, DenseI8
from sparsedge.kernels import cpu
from sparsedge.kernels.table import ACT_RELU, all_kernels

OUT, K = 37, 50  # not multiples of any block, tile or dot width
N_GEMM = 19


def weight(fmt, block, rng):
    w = rng.standard_normal((OUT, K)).astype(np.float32)
    if fmt == "dense_i8":
        return DenseI8.from_dense(w, mode="affine", granularity="channel")
    w[rng.random(w.shape) < 0.7] = 0
    w[3] = 0  # an empty row
    if fmt == "csr_i8":
        return CSRI8.from_dense(w)
    if fmt == "bsr_i8":
        return BSRI8.from_dense(w, block=tuple(block))
    raise ValueError(fmt)


def main(path):
    info = cpu.cpu_info()
    print(f"cpu: {info['arch']} {info['name']} features={sorted(info['features'])}", flush=True)
    rows = [r for r in all_kernels() if r.dtype == "int8" and not r.cpu]
    if not rows:
        raise SystemExit("no portable int8 kernel rows in the kernel table")
    results = {}
    t_all = time.perf_counter()
    for r in rows:
        rng = np.random.default_rng(1234)  # same weights and inputs for every row and core
        wf = weight(r.fmt, r.block, rng)
        n = 1 if r.max_n == 1 else N_GEMM
        x = (rng.standard_normal((K, n)) * 3).astype(np.float32)
        bias = rng.standard_normal(OUT).astype(np.float32)
        t0 = time.perf_counter()
        packed = r.prepare(wf)
        y = np.full((OUT, n), np.nan, np.float32)
        r.run(packed, x, y, bias, ACT_RELU, 0.0, 0.0, None)
        dt = time.perf_counter() - t0
        ref = r.reference(wf, x, bias, ACT_RELU, 0.0, 0.0, None)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=r.name)
        results[r.name] = y
        print(f"  {r.name:<22} N={n:<3} {dt:7.2f} s (first call: compile or cache load)", flush=True)
    np.savez(path, **results)
    print(f"{len(results)} int8 rows in {time.perf_counter() - t_all:.1f} s -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
