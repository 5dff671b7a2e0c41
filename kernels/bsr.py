"""BSR float32 kernels: ``Y[out, N] = act(W @ X + bias + residual)`` with W in r x c blocks.

W: ``indptr`` int32 [R+1] (R = ceil(out/r)), ``indices`` int32 [nblk] (block column),
``data`` float32 [nblk, r, c] (edge blocks zero-padded). ``prepare`` only reshapes ``data`` to a
[nblk, r*c] view (no repack; a copy only if the array is not contiguous): the packed tuple
``(indptr, indices, d2, r, c)`` is also what ``conv.sparse_conv_s1`` consumes. r and c are run-time ints, so two compiled GEMM
specializations serve every block shape:

* ``bsr_spmm_r1`` (r x 1 blocks with r % 8 == 0 or r == 4: the 4x1 / 8x1 / 16x1 rows). The work
  is split into (N chunk, block-row group) tasks, chunk-major: block-row groups hold equal shares
  of the non-zero blocks (``GROUPS_PER_THREAD`` per thread), and N is cut into chunks only when X
  is larger than ``X_CHUNK_FLOATS`` (4 MB). One worker per thread takes tasks from a shared atomic
  counter, so a thread that starts late (a sleeping pool thread after another library ran) or is
  preempted does fewer tasks instead of holding up the call. Per block row, register tiles run
  left to right over the chunk: 8 rows x 3 vectors (24 zmm accumulators; r % 8 == 0, 16x1 as two
  8-row halves) or 4 rows x 4 vectors (r == 4), then narrower tiles for the last vectors. Per
  stored block: one X load per vector and r broadcast-FMAs; the loop runs over 0-based slices of
  indices / data and addresses X and Y as flat arrays (no negative-index fix-ups in the hot
  loop). X rows that are not 64-byte aligned (base address, or N not a multiple of VW) make
  every vector load straddle two cache lines (ffn_n128 1 thread: ~12% slower): when each worker
  uses every X row at least ``COPY_MIN_USES`` times, each worker first copies X to its own
  aligned buffer. When X exceeds L2 (``L2_FLOATS``: 1 MB, e.g. the 1x1 conv 256x3136), each X
  row load also prefetches the same row two tiles ahead (software prefetch), which hides the
  L3 latency of the next tile. Fused epilogue: bias, residual and relu / relu6 / clamp are
  applied to each register tile right after its store, while it is in L1 (``_tile_ep``; a
  separate pass over the block row's output cost 15-25% on the 1x1-conv shape); other
  activations run in a second pass per block row. Columns beyond a multiple of VW are
  accumulated in memory.
* ``bsr_spmm`` (any other r x c: 1x4, 1x16, 4x4, ...): the same work split and atomic-counter
  hand-out as ``bsr_spmm_r1`` ((N chunk, block-row group) tasks, chunk-major, groups of equal
  non-zero share, ``GEN_GROUPS_PER_THREAD`` per thread), N chunks of whole register tiles sized so
  a chunk of X stays in L2. Per block row, rows in groups of 4 get 4-row x 4 / 2 / 1-vector tiles
  (16 accumulators: 4 X loads and 4 broadcasts per 16 FMAs); the other rows (1 x c blocks) get
  1-row x 8-vector tiles (8 independent accumulators, 8 X loads and 1 broadcast per 8 FMAs; 1x4
  blocks with in % 4 == 0 take all 4 columns of a block per step: ffn_n128 15-20% faster), then
  4 / 2 / 1-vector tiles whose accumulators are split over the block's columns (8 / 8 / 4 chains).
  A block's c X rows are consecutive: one index per block, flat X / Y / value addressing
  (``vbcastl``). 1-row x 2-vector tiles (2 chains per row) measured 2x slower on ffn_n128.
  Edge blocks: rows >= out are computed on the zero padding but never stored; X rows >= in are
  never read. Fused epilogue as in ``bsr_spmm_r1`` (``_tile_ep`` on each tile right after its
  store: bias + residual + relu / relu6 / clamp; a per-row pass over L1/L2-hot data cost 5-25%);
  other activations in a second pass per block row. Columns beyond a multiple of VW accumulated
  in memory. 1 x c blocks load one X vector per FMA (as CSR does): X streams from L2 once per
  output row, so they run at about CSR's speed (4-row groups use each X vector load for 4 FMAs).
* ``bsr_spmv`` (N = 1): per block row an r-vector accumulator; bytes per weight are
  (4 + 4*r*c) / (r*c) per stored block entry, i.e. close to 4 B for tall blocks. The 4x1 / 8x1 /
  16x1 loops prefetch W ``GEMV_PF`` blocks ahead (batch 1 is DRAM-bound when W does not fit in cache).
"""
from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ._jit import jit, pjit
from .csr import reference
from .epilogue import act_scalar, epilogue_tile, none1, none2
from .simd import VW, fetch_add, vadd, vbcast, vbcastl, vfma, vload, vmax, vmin, vprefetch, vstore, vzero
from .table import ACT_CLAMP, ACT_NONE, ACT_RELU, ACT_RELU6, KernelSpec

L2_FLOATS = 1 << 18  # 1 MB of floats: X chunk budget of the generic kernel; X above this gets prefetch
X_CHUNK_FLOATS = 1 << 20  # 4 MB of floats: r x 1 kernel splits N into chunks above this X size
GEMV_PF = 64  # batch-1 r x 1 kernels prefetch W this many blocks ahead (DRAM-streamed: 16-18% faster)
GEN_GROUPS_PER_THREAD = 4  # generic GEMM: nnz-balanced block-row groups per thread per N chunk
GROUPS_PER_THREAD = 2  # r x 1 GEMM: nnz-balanced block-row groups per thread, handed out on demand
COPY_MIN_USES = 4  # r x 1 GEMM: per-thread aligned X copy when each thread uses each X row >= this often


@jit
def _tile_c1(indices, d2, k0, k1, ii, x, yr, j0, m):
    """c == 1: yr[:m] += sum_k d2[k, ii] * x[indices[k], j0:j0+m]."""
    k = k0
    while k + 8 <= k1:
        v0 = d2[k, ii]
        v1 = d2[k + 1, ii]
        v2 = d2[k + 2, ii]
        v3 = d2[k + 3, ii]
        v4 = d2[k + 4, ii]
        v5 = d2[k + 5, ii]
        v6 = d2[k + 6, ii]
        v7 = d2[k + 7, ii]
        x0 = x[indices[k], j0:j0 + m]
        x1 = x[indices[k + 1], j0:j0 + m]
        x2 = x[indices[k + 2], j0:j0 + m]
        x3 = x[indices[k + 3], j0:j0 + m]
        x4 = x[indices[k + 4], j0:j0 + m]
        x5 = x[indices[k + 5], j0:j0 + m]
        x6 = x[indices[k + 6], j0:j0 + m]
        x7 = x[indices[k + 7], j0:j0 + m]
        for j in range(m):
            yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j]) + \
                     ((v4 * x4[j] + v5 * x5[j]) + (v6 * x6[j] + v7 * x7[j]))
        k += 8
    while k < k1:
        v0 = d2[k, ii]
        x0 = x[indices[k], j0:j0 + m]
        for j in range(m):
            yr[j] += v0 * x0[j]
        k += 1


@jit
def _tile_cn(indices, d2, k0, k1, ii, c, nin, x, yr, j0, m):
    """c > 1: block k covers X rows indices[k]*c .. +c (clipped to nin)."""
    base = ii * c
    for k in range(k0, k1):
        col0 = indices[k] * c
        cw = min(c, nin - col0)
        cc = 0
        while cc + 4 <= cw:
            v0 = d2[k, base + cc]
            v1 = d2[k, base + cc + 1]
            v2 = d2[k, base + cc + 2]
            v3 = d2[k, base + cc + 3]
            x0 = x[col0 + cc, j0:j0 + m]
            x1 = x[col0 + cc + 1, j0:j0 + m]
            x2 = x[col0 + cc + 2, j0:j0 + m]
            x3 = x[col0 + cc + 3, j0:j0 + m]
            for j in range(m):
                yr[j] += (v0 * x0[j] + v1 * x1[j]) + (v2 * x2[j] + v3 * x3[j])
            cc += 4
        while cc < cw:
            v0 = d2[k, base + cc]
            x0 = x[col0 + cc, j0:j0 + m]
            for j in range(m):
                yr[j] += v0 * x0[j]
            cc += 1


@jit(inline="always")
def _mk8x3(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j):
    """8 rows x 3 vectors at column j of the flat X / Y; idx: the block row's block columns; the
    8 values of block kk for these rows at ddf[kk * ldd + base:] (ddf: all values flat, ldd = r,
    base = first block * r + row offset in the block); register accumulators; stores rows < rows."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero(); a0_4 = vzero(); a0_5 = vzero(); a0_6 = vzero(); a0_7 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero(); a1_4 = vzero(); a1_5 = vzero(); a1_6 = vzero(); a1_7 = vzero()
    a2_0 = vzero(); a2_1 = vzero(); a2_2 = vzero(); a2_3 = vzero(); a2_4 = vzero(); a2_5 = vzero(); a2_6 = vzero(); a2_7 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        x1 = vload(xf, xo + 1 * VW)
        x2 = vload(xf, xo + 2 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        a1_0 = vfma(w, x1, a1_0)
        a2_0 = vfma(w, x2, a2_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        a1_1 = vfma(w, x1, a1_1)
        a2_1 = vfma(w, x2, a2_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        a1_2 = vfma(w, x1, a1_2)
        a2_2 = vfma(w, x2, a2_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        a1_3 = vfma(w, x1, a1_3)
        a2_3 = vfma(w, x2, a2_3)
        w = vbcastl(ddf, o + 4)
        a0_4 = vfma(w, x0, a0_4)
        a1_4 = vfma(w, x1, a1_4)
        a2_4 = vfma(w, x2, a2_4)
        w = vbcastl(ddf, o + 5)
        a0_5 = vfma(w, x0, a0_5)
        a1_5 = vfma(w, x1, a1_5)
        a2_5 = vfma(w, x2, a2_5)
        w = vbcastl(ddf, o + 6)
        a0_6 = vfma(w, x0, a0_6)
        a1_6 = vfma(w, x1, a1_6)
        a2_6 = vfma(w, x2, a2_6)
        w = vbcastl(ddf, o + 7)
        a0_7 = vfma(w, x0, a0_7)
        a1_7 = vfma(w, x1, a1_7)
        a2_7 = vfma(w, x2, a2_7)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
        vstore(yf, yo + 1 * VW, a1_0)
        vstore(yf, yo + 2 * VW, a2_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
        vstore(yf, yo + 1 * VW, a1_1)
        vstore(yf, yo + 2 * VW, a2_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
        vstore(yf, yo + 1 * VW, a1_2)
        vstore(yf, yo + 2 * VW, a2_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
        vstore(yf, yo + 1 * VW, a1_3)
        vstore(yf, yo + 2 * VW, a2_3)
    if 4 < rows:
        yo = (i0 + 4) * ldy + j
        vstore(yf, yo + 0 * VW, a0_4)
        vstore(yf, yo + 1 * VW, a1_4)
        vstore(yf, yo + 2 * VW, a2_4)
    if 5 < rows:
        yo = (i0 + 5) * ldy + j
        vstore(yf, yo + 0 * VW, a0_5)
        vstore(yf, yo + 1 * VW, a1_5)
        vstore(yf, yo + 2 * VW, a2_5)
    if 6 < rows:
        yo = (i0 + 6) * ldy + j
        vstore(yf, yo + 0 * VW, a0_6)
        vstore(yf, yo + 1 * VW, a1_6)
        vstore(yf, yo + 2 * VW, a2_6)
    if 7 < rows:
        yo = (i0 + 7) * ldy + j
        vstore(yf, yo + 0 * VW, a0_7)
        vstore(yf, yo + 1 * VW, a1_7)
        vstore(yf, yo + 2 * VW, a2_7)


@jit(inline="always")
def _mk8x3p(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j, pd):
    """As _mk8x3, plus a prefetch of each X row pd floats ahead (a later tile of the same row)."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero(); a0_4 = vzero(); a0_5 = vzero(); a0_6 = vzero(); a0_7 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero(); a1_4 = vzero(); a1_5 = vzero(); a1_6 = vzero(); a1_7 = vzero()
    a2_0 = vzero(); a2_1 = vzero(); a2_2 = vzero(); a2_3 = vzero(); a2_4 = vzero(); a2_5 = vzero(); a2_6 = vzero(); a2_7 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        x1 = vload(xf, xo + 1 * VW)
        x2 = vload(xf, xo + 2 * VW)
        vprefetch(xf, xo + pd + 0 * VW)
        vprefetch(xf, xo + pd + 1 * VW)
        vprefetch(xf, xo + pd + 2 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        a1_0 = vfma(w, x1, a1_0)
        a2_0 = vfma(w, x2, a2_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        a1_1 = vfma(w, x1, a1_1)
        a2_1 = vfma(w, x2, a2_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        a1_2 = vfma(w, x1, a1_2)
        a2_2 = vfma(w, x2, a2_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        a1_3 = vfma(w, x1, a1_3)
        a2_3 = vfma(w, x2, a2_3)
        w = vbcastl(ddf, o + 4)
        a0_4 = vfma(w, x0, a0_4)
        a1_4 = vfma(w, x1, a1_4)
        a2_4 = vfma(w, x2, a2_4)
        w = vbcastl(ddf, o + 5)
        a0_5 = vfma(w, x0, a0_5)
        a1_5 = vfma(w, x1, a1_5)
        a2_5 = vfma(w, x2, a2_5)
        w = vbcastl(ddf, o + 6)
        a0_6 = vfma(w, x0, a0_6)
        a1_6 = vfma(w, x1, a1_6)
        a2_6 = vfma(w, x2, a2_6)
        w = vbcastl(ddf, o + 7)
        a0_7 = vfma(w, x0, a0_7)
        a1_7 = vfma(w, x1, a1_7)
        a2_7 = vfma(w, x2, a2_7)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
        vstore(yf, yo + 1 * VW, a1_0)
        vstore(yf, yo + 2 * VW, a2_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
        vstore(yf, yo + 1 * VW, a1_1)
        vstore(yf, yo + 2 * VW, a2_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
        vstore(yf, yo + 1 * VW, a1_2)
        vstore(yf, yo + 2 * VW, a2_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
        vstore(yf, yo + 1 * VW, a1_3)
        vstore(yf, yo + 2 * VW, a2_3)
    if 4 < rows:
        yo = (i0 + 4) * ldy + j
        vstore(yf, yo + 0 * VW, a0_4)
        vstore(yf, yo + 1 * VW, a1_4)
        vstore(yf, yo + 2 * VW, a2_4)
    if 5 < rows:
        yo = (i0 + 5) * ldy + j
        vstore(yf, yo + 0 * VW, a0_5)
        vstore(yf, yo + 1 * VW, a1_5)
        vstore(yf, yo + 2 * VW, a2_5)
    if 6 < rows:
        yo = (i0 + 6) * ldy + j
        vstore(yf, yo + 0 * VW, a0_6)
        vstore(yf, yo + 1 * VW, a1_6)
        vstore(yf, yo + 2 * VW, a2_6)
    if 7 < rows:
        yo = (i0 + 7) * ldy + j
        vstore(yf, yo + 0 * VW, a0_7)
        vstore(yf, yo + 1 * VW, a1_7)
        vstore(yf, yo + 2 * VW, a2_7)


@jit(inline="always")
def _mk8x2(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j):
    """8 rows (rows base..base+7 of the block) x 2 vectors at column j of the flat X / Y;
    idx: the block row's block columns; block kk's values at ddf[kk * ldd + base:] (flat); register
    accumulators; stores rows < rows."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero(); a0_4 = vzero(); a0_5 = vzero(); a0_6 = vzero(); a0_7 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero(); a1_4 = vzero(); a1_5 = vzero(); a1_6 = vzero(); a1_7 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        x1 = vload(xf, xo + 1 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        a1_0 = vfma(w, x1, a1_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        a1_1 = vfma(w, x1, a1_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        a1_2 = vfma(w, x1, a1_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        a1_3 = vfma(w, x1, a1_3)
        w = vbcastl(ddf, o + 4)
        a0_4 = vfma(w, x0, a0_4)
        a1_4 = vfma(w, x1, a1_4)
        w = vbcastl(ddf, o + 5)
        a0_5 = vfma(w, x0, a0_5)
        a1_5 = vfma(w, x1, a1_5)
        w = vbcastl(ddf, o + 6)
        a0_6 = vfma(w, x0, a0_6)
        a1_6 = vfma(w, x1, a1_6)
        w = vbcastl(ddf, o + 7)
        a0_7 = vfma(w, x0, a0_7)
        a1_7 = vfma(w, x1, a1_7)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
        vstore(yf, yo + 1 * VW, a1_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
        vstore(yf, yo + 1 * VW, a1_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
        vstore(yf, yo + 1 * VW, a1_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
        vstore(yf, yo + 1 * VW, a1_3)
    if 4 < rows:
        yo = (i0 + 4) * ldy + j
        vstore(yf, yo + 0 * VW, a0_4)
        vstore(yf, yo + 1 * VW, a1_4)
    if 5 < rows:
        yo = (i0 + 5) * ldy + j
        vstore(yf, yo + 0 * VW, a0_5)
        vstore(yf, yo + 1 * VW, a1_5)
    if 6 < rows:
        yo = (i0 + 6) * ldy + j
        vstore(yf, yo + 0 * VW, a0_6)
        vstore(yf, yo + 1 * VW, a1_6)
    if 7 < rows:
        yo = (i0 + 7) * ldy + j
        vstore(yf, yo + 0 * VW, a0_7)
        vstore(yf, yo + 1 * VW, a1_7)


@jit(inline="always")
def _mk8x1(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j):
    """8 rows (rows base..base+7 of the block) x 1 vectors at column j of the flat X / Y;
    idx: the block row's block columns; block kk's values at ddf[kk * ldd + base:] (flat); register
    accumulators; stores rows < rows."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero(); a0_4 = vzero(); a0_5 = vzero(); a0_6 = vzero(); a0_7 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        w = vbcastl(ddf, o + 4)
        a0_4 = vfma(w, x0, a0_4)
        w = vbcastl(ddf, o + 5)
        a0_5 = vfma(w, x0, a0_5)
        w = vbcastl(ddf, o + 6)
        a0_6 = vfma(w, x0, a0_6)
        w = vbcastl(ddf, o + 7)
        a0_7 = vfma(w, x0, a0_7)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
    if 4 < rows:
        yo = (i0 + 4) * ldy + j
        vstore(yf, yo + 0 * VW, a0_4)
    if 5 < rows:
        yo = (i0 + 5) * ldy + j
        vstore(yf, yo + 0 * VW, a0_5)
    if 6 < rows:
        yo = (i0 + 6) * ldy + j
        vstore(yf, yo + 0 * VW, a0_6)
    if 7 < rows:
        yo = (i0 + 7) * ldy + j
        vstore(yf, yo + 0 * VW, a0_7)


@jit(inline="always")
def _mk4x4(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j):
    """4 rows (rows base..base+3 of the block) x 4 vectors at column j of the flat X / Y;
    idx: the block row's block columns; block kk's values at ddf[kk * ldd + base:] (flat); register
    accumulators; stores rows < rows."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero()
    a2_0 = vzero(); a2_1 = vzero(); a2_2 = vzero(); a2_3 = vzero()
    a3_0 = vzero(); a3_1 = vzero(); a3_2 = vzero(); a3_3 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        x1 = vload(xf, xo + 1 * VW)
        x2 = vload(xf, xo + 2 * VW)
        x3 = vload(xf, xo + 3 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        a1_0 = vfma(w, x1, a1_0)
        a2_0 = vfma(w, x2, a2_0)
        a3_0 = vfma(w, x3, a3_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        a1_1 = vfma(w, x1, a1_1)
        a2_1 = vfma(w, x2, a2_1)
        a3_1 = vfma(w, x3, a3_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        a1_2 = vfma(w, x1, a1_2)
        a2_2 = vfma(w, x2, a2_2)
        a3_2 = vfma(w, x3, a3_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        a1_3 = vfma(w, x1, a1_3)
        a2_3 = vfma(w, x2, a2_3)
        a3_3 = vfma(w, x3, a3_3)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
        vstore(yf, yo + 1 * VW, a1_0)
        vstore(yf, yo + 2 * VW, a2_0)
        vstore(yf, yo + 3 * VW, a3_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
        vstore(yf, yo + 1 * VW, a1_1)
        vstore(yf, yo + 2 * VW, a2_1)
        vstore(yf, yo + 3 * VW, a3_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
        vstore(yf, yo + 1 * VW, a1_2)
        vstore(yf, yo + 2 * VW, a2_2)
        vstore(yf, yo + 3 * VW, a3_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
        vstore(yf, yo + 1 * VW, a1_3)
        vstore(yf, yo + 2 * VW, a2_3)
        vstore(yf, yo + 3 * VW, a3_3)


@jit(inline="always")
def _mk4x4p(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j, pd):
    """As _mk4x4, plus a prefetch of each X row pd floats ahead (a later tile of the same row)."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero()
    a2_0 = vzero(); a2_1 = vzero(); a2_2 = vzero(); a2_3 = vzero()
    a3_0 = vzero(); a3_1 = vzero(); a3_2 = vzero(); a3_3 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        x1 = vload(xf, xo + 1 * VW)
        x2 = vload(xf, xo + 2 * VW)
        x3 = vload(xf, xo + 3 * VW)
        vprefetch(xf, xo + pd + 0 * VW)
        vprefetch(xf, xo + pd + 1 * VW)
        vprefetch(xf, xo + pd + 2 * VW)
        vprefetch(xf, xo + pd + 3 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        a1_0 = vfma(w, x1, a1_0)
        a2_0 = vfma(w, x2, a2_0)
        a3_0 = vfma(w, x3, a3_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        a1_1 = vfma(w, x1, a1_1)
        a2_1 = vfma(w, x2, a2_1)
        a3_1 = vfma(w, x3, a3_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        a1_2 = vfma(w, x1, a1_2)
        a2_2 = vfma(w, x2, a2_2)
        a3_2 = vfma(w, x3, a3_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        a1_3 = vfma(w, x1, a1_3)
        a2_3 = vfma(w, x2, a2_3)
        a3_3 = vfma(w, x3, a3_3)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
        vstore(yf, yo + 1 * VW, a1_0)
        vstore(yf, yo + 2 * VW, a2_0)
        vstore(yf, yo + 3 * VW, a3_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
        vstore(yf, yo + 1 * VW, a1_1)
        vstore(yf, yo + 2 * VW, a2_1)
        vstore(yf, yo + 3 * VW, a3_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
        vstore(yf, yo + 1 * VW, a1_2)
        vstore(yf, yo + 2 * VW, a2_2)
        vstore(yf, yo + 3 * VW, a3_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
        vstore(yf, yo + 1 * VW, a1_3)
        vstore(yf, yo + 2 * VW, a2_3)
        vstore(yf, yo + 3 * VW, a3_3)


@jit(inline="always")
def _mk4x2(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j):
    """4 rows (rows base..base+3 of the block) x 2 vectors at column j of the flat X / Y;
    idx: the block row's block columns; block kk's values at ddf[kk * ldd + base:] (flat); register
    accumulators; stores rows < rows."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        x1 = vload(xf, xo + 1 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        a1_0 = vfma(w, x1, a1_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        a1_1 = vfma(w, x1, a1_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        a1_2 = vfma(w, x1, a1_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
        a1_3 = vfma(w, x1, a1_3)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
        vstore(yf, yo + 1 * VW, a1_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
        vstore(yf, yo + 1 * VW, a1_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
        vstore(yf, yo + 1 * VW, a1_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)
        vstore(yf, yo + 1 * VW, a1_3)


@jit(inline="always")
def _mk4x1(idx, ddf, base, ldd, xf, ldx, yf, ldy, i0, rows, j):
    """4 rows (rows base..base+3 of the block) x 1 vectors at column j of the flat X / Y;
    idx: the block row's block columns; block kk's values at ddf[kk * ldd + base:] (flat); register
    accumulators; stores rows < rows."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * ldd + base  # block kk's values at ddf[o:o + r]: one address register for the broadcasts
        xo = idx[kk] * ldx + j
        x0 = vload(xf, xo + 0 * VW)
        w = vbcastl(ddf, o + 0)
        a0_0 = vfma(w, x0, a0_0)
        w = vbcastl(ddf, o + 1)
        a0_1 = vfma(w, x0, a0_1)
        w = vbcastl(ddf, o + 2)
        a0_2 = vfma(w, x0, a0_2)
        w = vbcastl(ddf, o + 3)
        a0_3 = vfma(w, x0, a0_3)
    if 0 < rows:
        yo = (i0 + 0) * ldy + j
        vstore(yf, yo + 0 * VW, a0_0)
    if 1 < rows:
        yo = (i0 + 1) * ldy + j
        vstore(yf, yo + 0 * VW, a0_1)
    if 2 < rows:
        yo = (i0 + 2) * ldy + j
        vstore(yf, yo + 0 * VW, a0_2)
    if 3 < rows:
        yo = (i0 + 3) * ldy + j
        vstore(yf, yo + 0 * VW, a0_3)


@jit(inline="always")
def _tile_ep(yf, ldy, i0, rows, j, nv, ep, bias, rf, ldr, vlo, vhi):
    """The epilogue of one register tile just stored (rows x nv vectors at column j, still in L1):
    y = (y + bias[row]) + rf[row * ldr + col] (zeros when absent), clamped to [vlo, vhi] when ep & 4."""
    for k in range(rows):
        yo = (i0 + k) * ldy + j
        ro = (i0 + k) * ldr + j
        b = vbcast(bias[i0 + k])
        for v in range(nv):
            a = vadd(vadd(vload(yf, yo + v * VW), b), vload(rf, ro + v * VW))
            if ep & 4:
                a = vmin(vmax(a, vlo), vhi)
            vstore(yf, yo + v * VW, a)


@jit
def _rowtiles(indptr, indices, df, r, br, xf, ldx, yf, ldy, nout, j0, j1, pd, ep, bias, rf, ldr, vlo, vhi):
    """r x 1 blocks (r % 8 == 0 or r == 4), values flat in df: Y rows of block row br, columns j0..j1 (a multiple
    of VW) = W @ X, widest register tile first; pd > 0: prefetch X pd floats ahead. ep != 0: each
    tile gets its epilogue (``_tile_ep``) right after its store, with bias [>= out] and residual rf
    (flat, row stride ldr; zeros when absent), clamped to [vlo, vhi] when ep & 4."""
    k0 = indptr[br]
    k1 = indptr[br + 1]
    idx = indices[k0:k1]
    i0 = br * r
    rows = min(r, nout - i0)
    j = j0
    if r == 4:
        if pd > 0:
            while j + 4 * VW <= j1:
                _mk4x4p(idx, df, k0 * r + 0, r, xf, ldx, yf, ldy, i0, rows, j, pd)
                if ep != 0:
                    _tile_ep(yf, ldy, i0, rows, j, 4, ep, bias, rf, ldr, vlo, vhi)
                j += 4 * VW
        while j + 4 * VW <= j1:
            _mk4x4(idx, df, k0 * r + 0, r, xf, ldx, yf, ldy, i0, rows, j)
            if ep != 0:
                _tile_ep(yf, ldy, i0, rows, j, 4, ep, bias, rf, ldr, vlo, vhi)
            j += 4 * VW
        while j + 2 * VW <= j1:
            _mk4x2(idx, df, k0 * r + 0, r, xf, ldx, yf, ldy, i0, rows, j)
            if ep != 0:
                _tile_ep(yf, ldy, i0, rows, j, 2, ep, bias, rf, ldr, vlo, vhi)
            j += 2 * VW
        while j + VW <= j1:
            _mk4x1(idx, df, k0 * r + 0, r, xf, ldx, yf, ldy, i0, rows, j)
            if ep != 0:
                _tile_ep(yf, ldy, i0, rows, j, 1, ep, bias, rf, ldr, vlo, vhi)
            j += VW
    else:
        if pd > 0:
            while j + 3 * VW <= j1:
                for g in range(0, rows, 8):
                    _mk8x3p(idx, df, k0 * r + g, r, xf, ldx, yf, ldy, i0 + g, rows - g, j, pd)
                if ep != 0:
                    _tile_ep(yf, ldy, i0, rows, j, 3, ep, bias, rf, ldr, vlo, vhi)
                j += 3 * VW
        while j + 3 * VW <= j1:
            for g in range(0, rows, 8):
                _mk8x3(idx, df, k0 * r + g, r, xf, ldx, yf, ldy, i0 + g, rows - g, j)
            if ep != 0:
                _tile_ep(yf, ldy, i0, rows, j, 3, ep, bias, rf, ldr, vlo, vhi)
            j += 3 * VW
        while j + 2 * VW <= j1:
            for g in range(0, rows, 8):
                _mk8x2(idx, df, k0 * r + g, r, xf, ldx, yf, ldy, i0 + g, rows - g, j)
            if ep != 0:
                _tile_ep(yf, ldy, i0, rows, j, 2, ep, bias, rf, ldr, vlo, vhi)
            j += 2 * VW
        while j + VW <= j1:
            for g in range(0, rows, 8):
                _mk8x1(idx, df, k0 * r + g, r, xf, ldx, yf, ldy, i0 + g, rows - g, j)
            if ep != 0:
                _tile_ep(yf, ldy, i0, rows, j, 1, ep, bias, rf, ldr, vlo, vhi)
            j += VW


@jit
def _task(indptr, indices, d2, r, b0, b1, xs, ld, x, y, jlo, jhi, tail, pd, ep, bz, rf, ldr, flo, fhi, actpass,
          bias, res, act, lo, hi):
    """One task of ``bsr_spmm_r1``: block rows b0..b1 over Y columns jlo..jhi (register tiles, X read
    from the flat xs with row stride ld), then the per-row second pass (activations that are not
    in-register, and the columns tail..N) when needed."""
    nout = y.shape[0]
    n = y.shape[1]
    yf = y.reshape(-1)
    vlo = vbcast(flo)
    vhi = vbcast(fhi)
    df = d2.reshape(-1)  # the values flat (block k's r values at df[k * r:(k + 1) * r])
    for br in range(b0, b1):
        _rowtiles(indptr, indices, df, r, br, xs, ld, yf, n, nout, jlo, jhi, pd, ep, bz, rf, ldr, vlo, vhi)
        if actpass or tail < n:
            _row_epilogue(indptr, indices, d2, r, br, x, y, nout, jlo, jhi if actpass else jlo, tail,
                          bias, res, act, lo, hi)


@jit
def _row_epilogue(indptr, indices, d2, r, br, x, y, nout, jlo, jhi, tail, bias, res, act, lo, hi):
    """r x 1 blocks, block row br: the activation pass over Y columns jlo..jhi (bias and residual
    already added in registers; empty range when the activation ran there too); if tail < N, also
    columns tail..N (fewer than VW) accumulated in memory, with their whole epilogue."""
    n = y.shape[1]
    nb = bias.shape[0]
    nr = res.shape[0]
    k0 = indptr[br]
    k1 = indptr[br + 1]
    i0 = br * r
    rows = min(r, nout - i0)
    for ii in range(rows):
        i = i0 + ii
        if jhi > jlo:
            yr = y[i, jlo:jhi]
            epilogue_tile(yr, np.float32(0.0), yr[0:0], act, lo, hi)
        if tail < n:
            mt = n - tail
            yr = y[i, tail:n]
            for j in range(mt):
                yr[j] = np.float32(0.0)
            _tile_c1(indices, d2, k0, k1, ii, x, yr, tail, mt)
            b = bias[i] if nb != 0 else np.float32(0.0)
            if nr != 0:
                epilogue_tile(yr, b, res[i, tail:n], act, lo, hi)
            else:
                epilogue_tile(yr, b, yr[0:0], act, lo, hi)


@jit(inline="always")
def _task_range(indptr, nnz, nbr, nvc, n, t, nch, nrg, ntile, tw):
    """Task t (chunk-major: N chunk ch = t // nrg, block-row group g) of ``bsr_spmm_r1`` and
    ``bsr_spmm``: Y columns jlo..jhi in register tiles, scalar tail from ``tail`` (last chunk only),
    block rows b0..b1 (groups hold equal shares of the blocks)."""
    ch = t // nrg
    g = t - ch * nrg
    jlo = ((ch * ntile) // nch) * tw
    jhi = (((ch + 1) * ntile) // nch) * tw
    tail = n
    if ch == nch - 1:
        jhi = nvc
        tail = nvc
    b0 = 0 if g == 0 else np.searchsorted(indptr, (g * nnz) // nrg)
    b1 = nbr if g == nrg - 1 else np.searchsorted(indptr, ((g + 1) * nnz) // nrg)
    return jlo, jhi, tail, b0, b1


@pjit
def _r1_workers(indptr, indices, d2, r, x, y, bias, res, act, lo, hi, nw, nch, nrg, ntile, tw, pd, ep,
                bz, rf, ldr, flo, fhi, actpass, cp, xbuf, xoff, npad, ctr):
    """The parallel part of ``bsr_spmm_r1``: nw workers take (N chunk, block-row group) tasks from
    the shared counter ctr[0] (chunk-major), each from its own aligned copy of X when cp."""
    nin = x.shape[0]
    n = x.shape[1]
    nbr = indptr.shape[0] - 1
    nnz = indptr[nbr]
    nvc = (n // VW) * VW
    xf = x.reshape(-1)
    ntask = nch * nrg
    for wk in prange(nw):
        xs = xf
        ld = n
        if cp:
            o = xoff + wk * nin * npad
            for q in range(nin):
                xbuf[o + q * npad:o + q * npad + n] = x[q]
            xs = xbuf[o:o + nin * npad]
            ld = npad
        t = fetch_add(ctr, 0, 1)
        while t < ntask:
            jlo, jhi, tail, b0, b1 = _task_range(indptr, nnz, nbr, nvc, n, t, nch, nrg, ntile, tw)
            _task(indptr, indices, d2, r, b0, b1, xs, ld, x, y, jlo, jhi, tail, pd, ep, bz, rf, ldr, flo, fhi,
                  actpass, bias, res, act, lo, hi)
            # dynamic hand-out: a worker that starts late or is preempted takes fewer tasks
            t = fetch_add(ctr, 0, 1)


@jit(inline="always")
def _tile_ep_setup(bias, res, act, lo, hi, nrows, n):
    """The register-tile epilogue's parameters (``_tile_ep``) for bias [>= nrows] / res [out, n] (or
    empty) and an activation: (ep, flo, fhi, actpass, bz, rf, ldr). ep: 0 none, 1 bias / residual,
    5 also a clamp to [flo, fhi] (relu, relu6, clamp); actpass: another activation, applied in a
    second pass per block row. bz / rf (row stride ldr): bias and residual, zeros standing in for an
    absent one (allocated only when the epilogue runs at all)."""
    ep = 0
    if bias.shape[0] != 0 or res.shape[0] != 0:
        ep = 1
    flo = np.float32(-np.inf)
    fhi = np.float32(np.inf)
    actpass = False
    if act == ACT_RELU:
        ep = 5
        flo = np.float32(0.0)
    elif act == ACT_RELU6:
        ep = 5
        flo = np.float32(0.0)
        fhi = np.float32(6.0)
    elif act == ACT_CLAMP:
        ep = 5
        flo = np.float32(lo)
        fhi = np.float32(hi)
    elif act != ACT_NONE:
        actpass = True
    bz = bias
    if bias.shape[0] == 0 and ep != 0:
        bz = np.zeros(nrows, np.float32)
    rf = res.reshape(-1)
    ldr = res.shape[1]
    if res.shape[0] == 0:
        ldr = 0
        if ep != 0:
            rf = np.zeros(n + VW, np.float32)  # every row reads this zero "residual" (row stride 0)
    return ep, flo, fhi, actpass, bz, rf, ldr


@jit
def bsr_spmm_r1(indptr, indices, d2, r, x, y, bias, res, act, lo, hi, nt):
    """Y = act(W @ X + bias + res) for r x 1 blocks, r % 8 == 0 or r == 4; d2 = data.reshape(nblk, r).
    x [in, N], y [out, N] C-contiguous float32; bias [out] / res [out, N] (C-contiguous) or empty;
    nt: the caller's thread count (sizes the work split)."""
    nin = x.shape[0]
    n = x.shape[1]
    nbr = indptr.shape[0] - 1
    nvc = (n // VW) * VW  # columns in whole vectors; the rest is the scalar tail
    tw = 4 * VW if r == 4 else 3 * VW  # widest register tile
    ntile = nvc // tw
    # N chunks only when X is large, in a multiple of the thread count (each thread owns chunks)
    nch = 1
    if nin * n > X_CHUNK_FLOATS and ntile >= 2 * nt:
        nch = min(ntile, (nin * n + X_CHUNK_FLOATS - 1) // X_CHUNK_FLOATS)
        nch = min(ntile // nt, (nch + nt - 1) // nt) * nt
    nrg = GROUPS_PER_THREAD * nt if nch == 1 else 1  # block-row groups of equal non-zero share
    nrg = max(1, min(nrg, nbr))
    nw = max(1, min(nt, nch * nrg))  # workers (one per thread); they take tasks from a shared counter
    pd = 2 * tw if nin * n > L2_FLOATS else 0
    nnz = indptr[nbr]
    ep, flo, fhi, actpass, bz, rf, ldr = _tile_ep_setup(bias, res, act, lo, hi, nbr * r, n)
    # X rows not 64-byte aligned: each worker reads its own aligned copy when it uses every X row
    # often enough (split vector loads measured ~12% slower, ffn_n128 1 thread)
    npad = (n + VW - 1) // VW * VW
    cp = (nch == 1 and n >= VW and nin > 0 and (x.ctypes.data % 64 != 0 or n % VW != 0)
          and nnz >= COPY_MIN_USES * nin * nw)
    xbuf = np.empty(nw * nin * npad + VW if cp else 0, np.float32)
    xoff = ((64 - xbuf.ctypes.data % 64) % 64) // 4 if cp else 0
    if nw == 1 and not cp:
        # one thread: the tasks in order, in the calling thread (no parallel region)
        xf = x.reshape(-1)
        for t in range(nch * nrg):
            jlo, jhi, tail, b0, b1 = _task_range(indptr, nnz, nbr, nvc, n, t, nch, nrg, ntile, tw)
            _task(indptr, indices, d2, r, b0, b1, xf, n, x, y, jlo, jhi, tail, pd, ep, bz, rf, ldr, flo, fhi,
                  actpass, bias, res, act, lo, hi)
        return
    ctr = np.zeros(16, np.int64)  # the task counter (own cache line)
    _r1_workers(indptr, indices, d2, r, x, y, bias, res, act, lo, hi, nw, nch, nrg, ntile, tw, pd, ep,
                bz, rf, ldr, flo, fhi, actpass, cp, xbuf, xoff, npad, ctr)


@jit
def _g1x8(indices, k0, k1, df, base, rc, c, nin, xf, ldx, yf, yo, j):
    """One output row x 8 vectors at column j (8 independent accumulators); block kk of the row's
    slice idx has this row's c values at df[kk * rc + base:]; X row q at xf[q * ldx:]; stores at yf[yo:]."""
    idx = indices[k0:k1]  # a slice made here: passing one to a call costs an atomic refcount pair per call
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero(); a4 = vzero(); a5 = vzero(); a6 = vzero(); a7 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        for cc in range(cw):
            w = vbcastl(df, o + cc)
            a0 = vfma(w, vload(xf, xo + 0 * VW), a0)
            a1 = vfma(w, vload(xf, xo + 1 * VW), a1)
            a2 = vfma(w, vload(xf, xo + 2 * VW), a2)
            a3 = vfma(w, vload(xf, xo + 3 * VW), a3)
            a4 = vfma(w, vload(xf, xo + 4 * VW), a4)
            a5 = vfma(w, vload(xf, xo + 5 * VW), a5)
            a6 = vfma(w, vload(xf, xo + 6 * VW), a6)
            a7 = vfma(w, vload(xf, xo + 7 * VW), a7)
            xo += ldx
    vstore(yf, yo + 0 * VW, a0)
    vstore(yf, yo + 1 * VW, a1)
    vstore(yf, yo + 2 * VW, a2)
    vstore(yf, yo + 3 * VW, a3)
    vstore(yf, yo + 4 * VW, a4)
    vstore(yf, yo + 5 * VW, a5)
    vstore(yf, yo + 6 * VW, a6)
    vstore(yf, yo + 7 * VW, a7)


@jit
def _g1x8c4(indices, k0, k1, df, base, xf, ldx, yf, yo, j):
    """_g1x8 for 1 x 4 blocks when in is a multiple of 4 (no edge block): each block's 4 columns in
    one step (32 FMAs; 7-9% faster than the column loop on ffn_n128)."""
    idx = indices[k0:k1]
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero(); a4 = vzero(); a5 = vzero(); a6 = vzero(); a7 = vzero()
    for kk in range(idx.shape[0]):
        o = kk * 4 + base
        xo = idx[kk] * 4 * ldx + j
        w = vbcastl(df, o + 0)
        a0 = vfma(w, vload(xf, xo + 0 * ldx + 0 * VW), a0)
        a1 = vfma(w, vload(xf, xo + 0 * ldx + 1 * VW), a1)
        a2 = vfma(w, vload(xf, xo + 0 * ldx + 2 * VW), a2)
        a3 = vfma(w, vload(xf, xo + 0 * ldx + 3 * VW), a3)
        a4 = vfma(w, vload(xf, xo + 0 * ldx + 4 * VW), a4)
        a5 = vfma(w, vload(xf, xo + 0 * ldx + 5 * VW), a5)
        a6 = vfma(w, vload(xf, xo + 0 * ldx + 6 * VW), a6)
        a7 = vfma(w, vload(xf, xo + 0 * ldx + 7 * VW), a7)
        w = vbcastl(df, o + 1)
        a0 = vfma(w, vload(xf, xo + 1 * ldx + 0 * VW), a0)
        a1 = vfma(w, vload(xf, xo + 1 * ldx + 1 * VW), a1)
        a2 = vfma(w, vload(xf, xo + 1 * ldx + 2 * VW), a2)
        a3 = vfma(w, vload(xf, xo + 1 * ldx + 3 * VW), a3)
        a4 = vfma(w, vload(xf, xo + 1 * ldx + 4 * VW), a4)
        a5 = vfma(w, vload(xf, xo + 1 * ldx + 5 * VW), a5)
        a6 = vfma(w, vload(xf, xo + 1 * ldx + 6 * VW), a6)
        a7 = vfma(w, vload(xf, xo + 1 * ldx + 7 * VW), a7)
        w = vbcastl(df, o + 2)
        a0 = vfma(w, vload(xf, xo + 2 * ldx + 0 * VW), a0)
        a1 = vfma(w, vload(xf, xo + 2 * ldx + 1 * VW), a1)
        a2 = vfma(w, vload(xf, xo + 2 * ldx + 2 * VW), a2)
        a3 = vfma(w, vload(xf, xo + 2 * ldx + 3 * VW), a3)
        a4 = vfma(w, vload(xf, xo + 2 * ldx + 4 * VW), a4)
        a5 = vfma(w, vload(xf, xo + 2 * ldx + 5 * VW), a5)
        a6 = vfma(w, vload(xf, xo + 2 * ldx + 6 * VW), a6)
        a7 = vfma(w, vload(xf, xo + 2 * ldx + 7 * VW), a7)
        w = vbcastl(df, o + 3)
        a0 = vfma(w, vload(xf, xo + 3 * ldx + 0 * VW), a0)
        a1 = vfma(w, vload(xf, xo + 3 * ldx + 1 * VW), a1)
        a2 = vfma(w, vload(xf, xo + 3 * ldx + 2 * VW), a2)
        a3 = vfma(w, vload(xf, xo + 3 * ldx + 3 * VW), a3)
        a4 = vfma(w, vload(xf, xo + 3 * ldx + 4 * VW), a4)
        a5 = vfma(w, vload(xf, xo + 3 * ldx + 5 * VW), a5)
        a6 = vfma(w, vload(xf, xo + 3 * ldx + 6 * VW), a6)
        a7 = vfma(w, vload(xf, xo + 3 * ldx + 7 * VW), a7)
    vstore(yf, yo + 0 * VW, a0)
    vstore(yf, yo + 1 * VW, a1)
    vstore(yf, yo + 2 * VW, a2)
    vstore(yf, yo + 3 * VW, a3)
    vstore(yf, yo + 4 * VW, a4)
    vstore(yf, yo + 5 * VW, a5)
    vstore(yf, yo + 6 * VW, a6)
    vstore(yf, yo + 7 * VW, a7)


@jit
def _g1x4(indices, k0, k1, df, base, rc, c, nin, xf, ldx, yf, yo, j):
    """As _g1x8 for 4 vectors; even / odd block columns feed two accumulator sets (8 chains)."""
    idx = indices[k0:k1]  # a slice made here: passing one to a call costs an atomic refcount pair per call
    a0 = vzero(); a1 = vzero(); a2 = vzero(); a3 = vzero()
    b0 = vzero(); b1 = vzero(); b2 = vzero(); b3 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        cc = 0
        while cc + 2 <= cw:
            w = vbcastl(df, o + cc)
            u = vbcastl(df, o + cc + 1)
            a0 = vfma(w, vload(xf, xo + 0 * VW), a0)
            a1 = vfma(w, vload(xf, xo + 1 * VW), a1)
            a2 = vfma(w, vload(xf, xo + 2 * VW), a2)
            a3 = vfma(w, vload(xf, xo + 3 * VW), a3)
            b0 = vfma(u, vload(xf, xo + ldx + 0 * VW), b0)
            b1 = vfma(u, vload(xf, xo + ldx + 1 * VW), b1)
            b2 = vfma(u, vload(xf, xo + ldx + 2 * VW), b2)
            b3 = vfma(u, vload(xf, xo + ldx + 3 * VW), b3)
            xo += 2 * ldx
            cc += 2
        if cc < cw:
            w = vbcastl(df, o + cc)
            a0 = vfma(w, vload(xf, xo + 0 * VW), a0)
            a1 = vfma(w, vload(xf, xo + 1 * VW), a1)
            a2 = vfma(w, vload(xf, xo + 2 * VW), a2)
            a3 = vfma(w, vload(xf, xo + 3 * VW), a3)
    vstore(yf, yo + 0 * VW, vadd(a0, b0))
    vstore(yf, yo + 1 * VW, vadd(a1, b1))
    vstore(yf, yo + 2 * VW, vadd(a2, b2))
    vstore(yf, yo + 3 * VW, vadd(a3, b3))


@jit
def _g1x2(indices, k0, k1, df, base, rc, c, nin, xf, ldx, yf, yo, j):
    """As _g1x8 for 2 vectors; block columns cc % 4 feed four accumulator sets (8 chains)."""
    idx = indices[k0:k1]  # a slice made here: passing one to a call costs an atomic refcount pair per call
    a0 = vzero(); a1 = vzero(); b0 = vzero(); b1 = vzero()
    e0 = vzero(); e1 = vzero(); f0 = vzero(); f1 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        cc = 0
        while cc + 4 <= cw:
            w = vbcastl(df, o + cc)
            a0 = vfma(w, vload(xf, xo), a0)
            a1 = vfma(w, vload(xf, xo + VW), a1)
            w = vbcastl(df, o + cc + 1)
            b0 = vfma(w, vload(xf, xo + ldx), b0)
            b1 = vfma(w, vload(xf, xo + ldx + VW), b1)
            w = vbcastl(df, o + cc + 2)
            e0 = vfma(w, vload(xf, xo + 2 * ldx), e0)
            e1 = vfma(w, vload(xf, xo + 2 * ldx + VW), e1)
            w = vbcastl(df, o + cc + 3)
            f0 = vfma(w, vload(xf, xo + 3 * ldx), f0)
            f1 = vfma(w, vload(xf, xo + 3 * ldx + VW), f1)
            xo += 4 * ldx
            cc += 4
        while cc < cw:
            w = vbcastl(df, o + cc)
            a0 = vfma(w, vload(xf, xo), a0)
            a1 = vfma(w, vload(xf, xo + VW), a1)
            xo += ldx
            cc += 1
    vstore(yf, yo, vadd(vadd(a0, b0), vadd(e0, f0)))
    vstore(yf, yo + VW, vadd(vadd(a1, b1), vadd(e1, f1)))


@jit
def _g1x1(indices, k0, k1, df, base, rc, c, nin, xf, ldx, yf, yo, j):
    """As _g1x8 for 1 vector; block columns cc % 4 feed four accumulators."""
    idx = indices[k0:k1]  # a slice made here: passing one to a call costs an atomic refcount pair per call
    a0 = vzero(); b0 = vzero(); e0 = vzero(); f0 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        cc = 0
        while cc + 4 <= cw:
            a0 = vfma(vbcastl(df, o + cc), vload(xf, xo), a0)
            b0 = vfma(vbcastl(df, o + cc + 1), vload(xf, xo + ldx), b0)
            e0 = vfma(vbcastl(df, o + cc + 2), vload(xf, xo + 2 * ldx), e0)
            f0 = vfma(vbcastl(df, o + cc + 3), vload(xf, xo + 3 * ldx), f0)
            xo += 4 * ldx
            cc += 4
        while cc < cw:
            a0 = vfma(vbcastl(df, o + cc), vload(xf, xo), a0)
            xo += ldx
            cc += 1
    vstore(yf, yo, vadd(vadd(a0, b0), vadd(e0, f0)))


@jit
def _g4x4(idx, df, base, rc, c, nin, xf, ldx, yf, yo, ldy, rows, j):
    """4 output rows (values of block kk at df[kk * rc + base + q * c:], q = 0..3) x 4 vectors at
    column j; stores rows < rows at yf[yo + q * ldy:]."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero()
    a2_0 = vzero(); a2_1 = vzero(); a2_2 = vzero(); a2_3 = vzero()
    a3_0 = vzero(); a3_1 = vzero(); a3_2 = vzero(); a3_3 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        for cc in range(cw):
            x0 = vload(xf, xo + 0 * VW)
            x1 = vload(xf, xo + 1 * VW)
            x2 = vload(xf, xo + 2 * VW)
            x3 = vload(xf, xo + 3 * VW)
            w = vbcastl(df, o + cc)
            a0_0 = vfma(w, x0, a0_0)
            a1_0 = vfma(w, x1, a1_0)
            a2_0 = vfma(w, x2, a2_0)
            a3_0 = vfma(w, x3, a3_0)
            w = vbcastl(df, o + c + cc)
            a0_1 = vfma(w, x0, a0_1)
            a1_1 = vfma(w, x1, a1_1)
            a2_1 = vfma(w, x2, a2_1)
            a3_1 = vfma(w, x3, a3_1)
            w = vbcastl(df, o + 2 * c + cc)
            a0_2 = vfma(w, x0, a0_2)
            a1_2 = vfma(w, x1, a1_2)
            a2_2 = vfma(w, x2, a2_2)
            a3_2 = vfma(w, x3, a3_2)
            w = vbcastl(df, o + 3 * c + cc)
            a0_3 = vfma(w, x0, a0_3)
            a1_3 = vfma(w, x1, a1_3)
            a2_3 = vfma(w, x2, a2_3)
            a3_3 = vfma(w, x3, a3_3)
            xo += ldx
    vstore(yf, yo + 0 * VW, a0_0)
    vstore(yf, yo + 1 * VW, a1_0)
    vstore(yf, yo + 2 * VW, a2_0)
    vstore(yf, yo + 3 * VW, a3_0)
    if 1 < rows:
        vstore(yf, yo + ldy + 0 * VW, a0_1)
        vstore(yf, yo + ldy + 1 * VW, a1_1)
        vstore(yf, yo + ldy + 2 * VW, a2_1)
        vstore(yf, yo + ldy + 3 * VW, a3_1)
    if 2 < rows:
        vstore(yf, yo + 2 * ldy + 0 * VW, a0_2)
        vstore(yf, yo + 2 * ldy + 1 * VW, a1_2)
        vstore(yf, yo + 2 * ldy + 2 * VW, a2_2)
        vstore(yf, yo + 2 * ldy + 3 * VW, a3_2)
    if 3 < rows:
        vstore(yf, yo + 3 * ldy + 0 * VW, a0_3)
        vstore(yf, yo + 3 * ldy + 1 * VW, a1_3)
        vstore(yf, yo + 3 * ldy + 2 * VW, a2_3)
        vstore(yf, yo + 3 * ldy + 3 * VW, a3_3)


@jit
def _g4x2(idx, df, base, rc, c, nin, xf, ldx, yf, yo, ldy, rows, j):
    """As _g4x4 for 2 vectors."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    a1_0 = vzero(); a1_1 = vzero(); a1_2 = vzero(); a1_3 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        for cc in range(cw):
            x0 = vload(xf, xo + 0 * VW)
            x1 = vload(xf, xo + 1 * VW)
            w = vbcastl(df, o + cc)
            a0_0 = vfma(w, x0, a0_0)
            a1_0 = vfma(w, x1, a1_0)
            w = vbcastl(df, o + c + cc)
            a0_1 = vfma(w, x0, a0_1)
            a1_1 = vfma(w, x1, a1_1)
            w = vbcastl(df, o + 2 * c + cc)
            a0_2 = vfma(w, x0, a0_2)
            a1_2 = vfma(w, x1, a1_2)
            w = vbcastl(df, o + 3 * c + cc)
            a0_3 = vfma(w, x0, a0_3)
            a1_3 = vfma(w, x1, a1_3)
            xo += ldx
    vstore(yf, yo + 0 * VW, a0_0)
    vstore(yf, yo + 1 * VW, a1_0)
    if 1 < rows:
        vstore(yf, yo + ldy + 0 * VW, a0_1)
        vstore(yf, yo + ldy + 1 * VW, a1_1)
    if 2 < rows:
        vstore(yf, yo + 2 * ldy + 0 * VW, a0_2)
        vstore(yf, yo + 2 * ldy + 1 * VW, a1_2)
    if 3 < rows:
        vstore(yf, yo + 3 * ldy + 0 * VW, a0_3)
        vstore(yf, yo + 3 * ldy + 1 * VW, a1_3)


@jit
def _g4x1(idx, df, base, rc, c, nin, xf, ldx, yf, yo, ldy, rows, j):
    """As _g4x4 for 1 vector."""
    a0_0 = vzero(); a0_1 = vzero(); a0_2 = vzero(); a0_3 = vzero()
    for kk in range(idx.shape[0]):
        col0 = idx[kk] * c
        cw = min(c, nin - col0)
        o = kk * rc + base
        xo = col0 * ldx + j
        for cc in range(cw):
            x0 = vload(xf, xo)
            a0_0 = vfma(vbcastl(df, o + cc), x0, a0_0)
            a0_1 = vfma(vbcastl(df, o + c + cc), x0, a0_1)
            a0_2 = vfma(vbcastl(df, o + 2 * c + cc), x0, a0_2)
            a0_3 = vfma(vbcastl(df, o + 3 * c + cc), x0, a0_3)
            xo += ldx
    vstore(yf, yo, a0_0)
    if 1 < rows:
        vstore(yf, yo + ldy, a0_1)
    if 2 < rows:
        vstore(yf, yo + 2 * ldy, a0_2)
    if 3 < rows:
        vstore(yf, yo + 3 * ldy, a0_3)


@jit
def _gtask(indptr, indices, df, d2, r, c, b0, b1, xf, x, y, jlo, jhi, tail, ep, bz, rf, ldr, flo, fhi, actpass,
           bias, res, act, lo, hi):
    """One task of ``bsr_spmm``: block rows b0..b1, Y columns jlo..jhi (a multiple of VW) in
    register tiles (4-row groups of the block: 4 / 2 / 1 vectors; other rows one at a time:
    8 / 4 / 2 / 1 vectors), each tile followed by its epilogue while in L1 when ep (``_tile_ep``:
    bias bz, residual rf, clamp to [flo, fhi]); then the activation pass when actpass, and columns
    tail..N (fewer than VW) accumulated in memory with their whole epilogue."""
    nout = y.shape[0]
    nin = x.shape[0]
    n = y.shape[1]
    nb = bias.shape[0]
    nr = res.shape[0]
    yf = y.reshape(-1)
    vlo = vbcast(flo)
    vhi = vbcast(fhi)
    rc = r * c
    c4 = r == 1 and c == 4 and nin % 4 == 0
    for br in range(b0, b1):
        k0 = indptr[br]
        k1 = indptr[br + 1]
        idx = indices[k0:k1]
        i0 = br * r
        rows = min(r, nout - i0)
        g = 0
        while g + 4 <= r and g < rows:
            base = k0 * rc + g * c
            yo = (i0 + g) * n
            rg = min(4, rows - g)
            j = jlo
            while j + 4 * VW <= jhi:
                _g4x4(idx, df, base, rc, c, nin, xf, n, yf, yo + j, n, rg, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, rg, j, 4, ep, bz, rf, ldr, vlo, vhi)
                j += 4 * VW
            if j + 2 * VW <= jhi:
                _g4x2(idx, df, base, rc, c, nin, xf, n, yf, yo + j, n, rg, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, rg, j, 2, ep, bz, rf, ldr, vlo, vhi)
                j += 2 * VW
            if j + VW <= jhi:
                _g4x1(idx, df, base, rc, c, nin, xf, n, yf, yo + j, n, rg, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, rg, j, 1, ep, bz, rf, ldr, vlo, vhi)
            g += 4
        while g < rows:
            base = k0 * rc + g * c
            yo = (i0 + g) * n
            j = jlo
            if c4:
                while j + 8 * VW <= jhi:
                    _g1x8c4(indices, k0, k1, df, base, xf, n, yf, yo + j, j)
                    if ep != 0:
                        _tile_ep(yf, n, i0 + g, 1, j, 8, ep, bz, rf, ldr, vlo, vhi)
                    j += 8 * VW
            while j + 8 * VW <= jhi:
                _g1x8(indices, k0, k1, df, base, rc, c, nin, xf, n, yf, yo + j, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, 1, j, 8, ep, bz, rf, ldr, vlo, vhi)
                j += 8 * VW
            if j + 4 * VW <= jhi:
                _g1x4(indices, k0, k1, df, base, rc, c, nin, xf, n, yf, yo + j, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, 1, j, 4, ep, bz, rf, ldr, vlo, vhi)
                j += 4 * VW
            if j + 2 * VW <= jhi:
                _g1x2(indices, k0, k1, df, base, rc, c, nin, xf, n, yf, yo + j, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, 1, j, 2, ep, bz, rf, ldr, vlo, vhi)
                j += 2 * VW
            if j + VW <= jhi:
                _g1x1(indices, k0, k1, df, base, rc, c, nin, xf, n, yf, yo + j, j)
                if ep != 0:
                    _tile_ep(yf, n, i0 + g, 1, j, 1, ep, bz, rf, ldr, vlo, vhi)
            g += 1
        if actpass and jhi > jlo:
            for ii in range(rows):
                yr = y[i0 + ii, jlo:jhi]
                epilogue_tile(yr, np.float32(0.0), yr[0:0], act, lo, hi)
        if tail < n:
            m = n - tail
            for ii in range(rows):
                i = i0 + ii
                yr = y[i, tail:n]
                for j in range(m):
                    yr[j] = np.float32(0.0)
                if c == 1:
                    _tile_c1(indices, d2, k0, k1, ii, x, yr, tail, m)
                else:
                    _tile_cn(indices, d2, k0, k1, ii, c, nin, x, yr, tail, m)
                b = bias[i] if nb != 0 else np.float32(0.0)
                if nr != 0:
                    epilogue_tile(yr, b, res[i, tail:n], act, lo, hi)
                else:
                    epilogue_tile(yr, b, yr[0:0], act, lo, hi)


@pjit
def _g_workers(indptr, indices, d2, r, c, x, y, bias, res, act, lo, hi, nw, nch, nrg, ntile, tw, ep, bz, rf, ldr,
               flo, fhi, actpass, ctr):
    """The parallel part of ``bsr_spmm``: nw workers take tasks from the shared counter ctr[0]."""
    n = x.shape[1]
    nbr = indptr.shape[0] - 1
    nnz = indptr[nbr]
    nvc = (n // VW) * VW
    xf = x.reshape(-1)
    df = d2.reshape(-1)
    ntask = nch * nrg
    for wk in prange(nw):
        t = fetch_add(ctr, 0, 1)
        while t < ntask:
            jlo, jhi, tail, b0, b1 = _task_range(indptr, nnz, nbr, nvc, n, t, nch, nrg, ntile, tw)
            _gtask(indptr, indices, df, d2, r, c, b0, b1, xf, x, y, jlo, jhi, tail, ep, bz, rf, ldr, flo, fhi,
                   actpass, bias, res, act, lo, hi)
            # dynamic hand-out: a worker that starts late or is preempted takes fewer tasks
            t = fetch_add(ctr, 0, 1)


@jit
def bsr_spmm(indptr, indices, d2, r, c, x, y, bias, res, act, lo, hi, nt):
    """Y = act(W @ X + bias + res), any r x c; d2 = data.reshape(nblk, r*c). x [in, N], y [out, N]
    C-contiguous float32; bias [out] / res [out, N] (C-contiguous) or empty; nt: the caller's thread
    count (sizes the work split)."""
    nin = x.shape[0]
    n = x.shape[1]
    nbr = indptr.shape[0] - 1
    nvc = (n // VW) * VW  # columns in whole vectors; the rest is the scalar tail
    tw = 4 * VW if r >= 4 else 8 * VW  # widest register tile of the block's row groups
    ntile = nvc // tw
    # N chunks (whole tiles) sized so a chunk of X (nin rows) stays in L2 while every block row uses it
    ncmax = max(1, L2_FLOATS // max(nin * tw, 1))  # tiles per chunk
    nch = max(1, min(ntile, (ntile + ncmax - 1) // ncmax))
    nrg = max(1, min(nbr, GEN_GROUPS_PER_THREAD * nt))  # block-row groups of equal non-zero share
    nw = max(1, min(nt, nch * nrg))  # workers (one per thread); they take tasks from a shared counter
    ep, flo, fhi, actpass, bz, rf, ldr = _tile_ep_setup(bias, res, act, lo, hi, nbr * r, n)
    if nw == 1:
        # one thread: the tasks in order, in the calling thread (no parallel region)
        nnz = indptr[nbr]
        xf = x.reshape(-1)
        df = d2.reshape(-1)
        for t in range(nch * nrg):
            jlo, jhi, tail, b0, b1 = _task_range(indptr, nnz, nbr, nvc, n, t, nch, nrg, ntile, tw)
            _gtask(indptr, indices, df, d2, r, c, b0, b1, xf, x, y, jlo, jhi, tail, ep, bz, rf, ldr, flo, fhi,
                   actpass, bias, res, act, lo, hi)
        return
    ctr = np.zeros(16, np.int64)  # the task counter (own cache line)
    _g_workers(indptr, indices, d2, r, c, x, y, bias, res, act, lo, hi, nw, nch, nrg, ntile, tw, ep, bz, rf, ldr,
               flo, fhi, actpass, ctr)


@jit
def _gemv8(indices, d2, k0, k1, x, a, base):
    """r x 1 blocks: a[base:base+8] = sum_k d2[k, base:base+8] * x[indices[k]] (8 register accumulators);
    prefetches the blocks GEMV_PF ahead (batch 1 streams W from DRAM)."""
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
    a4 = np.float32(0.0); a5 = np.float32(0.0); a6 = np.float32(0.0); a7 = np.float32(0.0)
    df = d2.reshape(-1)
    w = d2.shape[1]
    for k in range(k0, k1):
        vprefetch(df, (k + GEMV_PF) * w)
        vprefetch(indices, k + 4 * GEMV_PF)
        xv = x[indices[k]]
        dk = d2[k, base:base + 8]
        a0 += dk[0] * xv; a1 += dk[1] * xv; a2 += dk[2] * xv; a3 += dk[3] * xv
        a4 += dk[4] * xv; a5 += dk[5] * xv; a6 += dk[6] * xv; a7 += dk[7] * xv
    a[base] = a0; a[base + 1] = a1; a[base + 2] = a2; a[base + 3] = a3
    a[base + 4] = a4; a[base + 5] = a5; a[base + 6] = a6; a[base + 7] = a7


@jit
def _gemv4(indices, d2, k0, k1, x, a):
    """4 x 1 blocks, two blocks per step into two accumulator sets; prefetches GEMV_PF blocks ahead."""
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
    b0 = np.float32(0.0); b1 = np.float32(0.0); b2 = np.float32(0.0); b3 = np.float32(0.0)
    df = d2.reshape(-1)
    k = k0
    while k + 2 <= k1:
        vprefetch(df, (k + GEMV_PF) * 4)
        vprefetch(indices, k + 4 * GEMV_PF)
        xv = x[indices[k]]
        dk = d2[k, 0:4]
        a0 += dk[0] * xv; a1 += dk[1] * xv; a2 += dk[2] * xv; a3 += dk[3] * xv
        xw = x[indices[k + 1]]
        dl = d2[k + 1, 0:4]
        b0 += dl[0] * xw; b1 += dl[1] * xw; b2 += dl[2] * xw; b3 += dl[3] * xw
        k += 2
    if k < k1:
        xv = x[indices[k]]
        dk = d2[k, 0:4]
        a0 += dk[0] * xv; a1 += dk[1] * xv; a2 += dk[2] * xv; a3 += dk[3] * xv
    a[0] = a0 + b0; a[1] = a1 + b1; a[2] = a2 + b2; a[3] = a3 + b3


@pjit
def bsr_spmv(indptr, indices, d2, r, c, x, y, bias, res, act, lo, hi):
    """y = act(W @ x + bias + res) for 1-D x [in], y [out]; bias/res [out] or len 0."""
    nout = y.shape[0]
    nin = x.shape[0]
    nb = bias.shape[0]
    nr = res.shape[0]
    nbr = indptr.shape[0] - 1
    acc = np.zeros((nbr, r), dtype=np.float32)
    for br in prange(nbr):
        a = acc[br]
        if c == 1 and r == 8:
            _gemv8(indices, d2, indptr[br], indptr[br + 1], x, a, 0)
        elif c == 1 and r == 16:
            _gemv8(indices, d2, indptr[br], indptr[br + 1], x, a, 0)
            _gemv8(indices, d2, indptr[br], indptr[br + 1], x, a, 8)
        elif c == 1 and r == 4:
            _gemv4(indices, d2, indptr[br], indptr[br + 1], x, a)
        elif c == 1:
            for k in range(indptr[br], indptr[br + 1]):
                xv = x[indices[k]]
                dk = d2[k]
                for ii in range(r):
                    a[ii] += dk[ii] * xv
        else:
            for k in range(indptr[br], indptr[br + 1]):
                col0 = indices[k] * c
                cw = min(c, nin - col0)
                xs = x[col0:col0 + cw]
                dk = d2[k]
                for ii in range(r):
                    dr = dk[ii * c:ii * c + cw]
                    s = np.float32(0.0)
                    for cc in range(cw):
                        s += dr[cc] * xs[cc]
                    a[ii] += s
        rows = min(r, nout - br * r)
        for ii in range(rows):
            i = br * r + ii
            s = a[ii]
            if nb != 0:
                s += bias[i]
            if nr != 0:
                s += res[i]
            y[i] = act_scalar(s, act, lo, hi)



# ---------------------------------------------------------------------------------------
# table glue

def _prepare(fmt):
    a = fmt.arrays()
    d = np.ascontiguousarray(a["data"])  # no copy for a contiguous array (the kernels view it flat)
    r, c = int(d.shape[1]), int(d.shape[2])
    return (a["indptr"], a["indices"], d.reshape(d.shape[0], r * c), r, c)


def _run_gemm(p, x, y, bias, act, lo, hi, residual):
    r, c = p[3], p[4]
    if c == 1 and (r % 8 == 0 or r == 4):
        # the r x 1 kernel views X / Y / residual as flat arrays: C-contiguous (no copy when they are)
        x = np.ascontiguousarray(x)
        residual = None if residual is None else np.ascontiguousarray(residual)
        yc = y if y.flags.c_contiguous else np.empty(y.shape, np.float32)
        bsr_spmm_r1(p[0], p[1], p[2], r, x, yc, none1(bias), none2(residual), int(act), float(lo), float(hi),
                    numba.get_num_threads())
        if yc is not y:
            y[...] = yc
    else:
        # the generic kernel views X / Y as flat arrays: C-contiguous (no copy when they are)
        x = np.ascontiguousarray(x)
        residual = None if residual is None else np.ascontiguousarray(residual)
        yc = y if y.flags.c_contiguous else np.empty(y.shape, np.float32)
        bsr_spmm(p[0], p[1], p[2], r, c, x, yc, none1(bias), none2(residual), int(act), float(lo), float(hi),
                 numba.get_num_threads())
        if yc is not y:
            y[...] = yc


def _run_gemv(p, x, y, bias, act, lo, hi, residual):
    r = none1(None if residual is None else residual.reshape(-1))
    bsr_spmv(p[0], p[1], p[2], p[3], p[4], x.reshape(-1), y.reshape(-1), none1(bias), r, int(act),
             float(lo), float(hi))


BLOCKS = [(1, 4), (4, 1), (8, 1), (16, 1), (1, 16), (4, 4)]

KERNELS = []
for _r, _c in BLOCKS:
    _fast = _c == 1 and (_r % 8 == 0 or _r == 4)
    KERNELS.append(KernelSpec(name=f"bsr{_r}x{_c}_f32_spmm", op="gemm", fmt="bsr", dtype="float32",
                              block=(_r, _c), prepare=_prepare, run=_run_gemm, reference=reference, min_n=1,
                              notes=("bsr_spmm_r1: nnz-balanced block-row groups taken on demand by one worker per thread "
                                     "(N chunks only for X > 4 MB); " + ("4x4" if _r == 4 else "8x3")
                                     + " register tiles (rows x vectors), bias / residual / relu / relu6 / clamp on each "
                                     "tile in L1; aligned per-worker X copy when X is misaligned; X prefetch when X > L2")
                              if _fast else
                              "bsr_spmm: nnz-balanced (N chunk, block-row group) tasks taken on demand; 4x4 / 1x8 register tiles (rows x vectors)"))
    KERNELS.append(KernelSpec(name=f"bsr{_r}x{_c}_f32_spmv", op="gemv", fmt="bsr", dtype="float32",
                              block=(_r, _c), prepare=_prepare, run=_run_gemv, reference=reference, min_n=1,
                              max_n=1, notes="batch 1; register accumulators for 4x1 / 8x1 / 16x1, generic loop otherwise"))
