"""_attention (runtime-internal): the multi-head attention core the Session fuses at load from

    Qh = transpose(reshape(q, [B, Sq, H, D]), [0, 2, 1, 3])
    Kt = transpose(reshape(k, [B, Sk, H, D]), [0, 2, 3, 1])
    Vh = transpose(reshape(v, [B, Sk, H, D]), [0, 2, 1, 3])
    y  = transpose(matmul(softmax(matmul(Qh, Kt) * scale + mask), Vh), [0, 2, 1, 3])

(the scale folded into the softmax by ``_fuse_softmax_scale``; mask optional, float32
``[B or 1, 1, 1, Sk]``). Inputs q [B, Sq, H*D], k, v [B, Sk, H*D] in torch layout (the q / k /
v linears' outputs), output y [B, Sq, H, D]. One parallel numba pass
(``kernels.nn.attention_heads``) per call: no transposed copies, no [B, H, Sq, Sk] score buffer,
each head's scores stay in L1. With attr ``qkv`` (``Session._fuse_qkv``) the q, k, v linears are
one linear whose output ``[B, S, 3*H*D]`` is the only data input (q, k, v at column offsets 0,
H*D, 2*H*D); when that linear runs a kernel (not dense BLAS) it writes the output feature-major
(``[3*H*D, B*S]``, no transpose back) and the attention reads it so. When its output is read only through a reshape to
``[B, S, H*D]`` by linears running kernels (``Session._feature_major_values``), it writes that
output feature-major too (``[H*D, B*S]``): no transpose before the o-proj linear.
"""
from __future__ import annotations

import numpy as np

from . import NodePlan, Op, register_internal

_NO_MASK = np.zeros((0, 0), dtype=np.float32)


@register_internal("_attention")
class Attention(Op):
    def __init__(self, node, ctx):
        super().__init__(node, ctx)
        self.H = int(self.attrs["heads"])
        self.D = int(self.attrs["head_dim"])
        self.scale = np.float32(self.attrs.get("scale", 1.0))
        self.qkv = bool(self.attrs.get("qkv", False))
        self.fm_in = self.qkv and node.inputs[0] in ctx.fm_values
        # output feature-major [H*D, B*Sq] when only (through a reshape) kernel-path linears read it
        self.fm_out = node.outputs[0] in ctx.fm_values

    def plan(self, ins, outs, env):
        return NodePlan(kernel="nn.attention_heads")

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import attention_heads

        HD = self.H * self.D
        mask = ins[3] if len(ins) > 3 else None
        cs = 1
        if self.qkv:  # one fused q|k|v linear output [B, S, 3*H*D]: offset views, row stride 3*H*D
            x = ins[0] if ins[0].dtype == np.float32 else ins[0].astype(np.float32)
            B, Sq = x.shape[0], x.shape[1]
            Sk = Sq
            f = np.ascontiguousarray(x).reshape(-1)
            if self.fm_in:  # the linear wrote it feature-major: [3*H*D, B*S]
                n = B * Sq
                q, k, v, ldq, ldkv, cs = f, f[HD * n:], f[2 * HD * n:], 1, 1, n
            else:
                q, k, v, ldq, ldkv = f, f[HD:], f[2 * HD:], 3 * HD, 3 * HD
        else:
            q, k, v = (np.ascontiguousarray(a, dtype=np.float32) for a in ins[:3])
            B, Sq = q.shape[0], q.shape[1]
            Sk = k.shape[1]
            q, k, v, ldq, ldkv = q.reshape(-1), k.reshape(-1), v.reshape(-1), HD, HD
        if mask is None:
            m2 = _NO_MASK
        else:
            m2 = np.ascontiguousarray(mask, dtype=np.float32).reshape(-1, Sk)
        attention_heads(q, k, v, m2, self.scale, outs[0].reshape(-1), B, Sq, Sk, self.H, self.D, ldq, ldkv, cs,
                        B * Sq if self.fm_out and B * Sq > 1 else 1)
