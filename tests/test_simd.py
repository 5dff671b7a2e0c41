"""kernels/simd.py intrinsics against numpy on one vector."""
import numpy as np

from sparsedge.kernels._jit import jit
from sparsedge.kernels.simd import VW, vadd, vbcast, vbcastl, vfma, vload, vmax, vmin, vmul, vstore, vzero


@jit
def _all_ops(a, b, out):
    x = vload(a, 1)
    y = vload(b, 0)
    vstore(out, 0 * VW, vmax(x, y))
    vstore(out, 1 * VW, vmin(x, vbcast(np.float32(0.25))))
    vstore(out, 2 * VW, vmul(x, y))
    vstore(out, 3 * VW, vadd(x, vzero()))
    vstore(out, 4 * VW, vfma(x, y, vbcast(np.float32(1.0))))
    for k in range(3):  # a[k + 2], loaded through the pointer offset
        vstore(out, (5 + k) * VW, vbcastl(a, k + 2))


def test_vector_ops_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(VW + 1).astype(np.float32)   # unaligned load at offset 1
    b = rng.standard_normal(VW).astype(np.float32)
    out = np.full(8 * VW, np.nan, np.float32)
    _all_ops(a, b, out)
    x = a[1:]
    np.testing.assert_array_equal(out[:VW], np.maximum(x, b))
    np.testing.assert_array_equal(out[VW:2 * VW], np.minimum(x, np.float32(0.25)))
    np.testing.assert_allclose(out[2 * VW:3 * VW], x * b, rtol=1e-6)
    np.testing.assert_array_equal(out[3 * VW:4 * VW], x)
    np.testing.assert_allclose(out[4 * VW:5 * VW], x * b + 1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[5 * VW:].reshape(3, VW), np.repeat(a[2:5, None], VW, axis=1))
