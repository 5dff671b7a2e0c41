"""_attention (runtime-internal): the multi-head attention core the Session fuses at load from

    Qh = transpose(reshape(q, [B, Sq, H, D]), [0, 2, 1, 3])
    Kt = transpose(reshape(k, [B, Sk, H, D]), [0, 2, 3, 1])
    Vh = transpose(reshape(v, [B, Sk, H, D]), [0, 2, 1, 3])
    y  = transpose(matmul(softmax(matmul(Qh, Kt) * scale + mask), Vh), [0, 2, 1, 3])

(the scale folded into the softmax by ``_fuse_softmax_scale``; mask optional, float32
``[B or 1, 1, 1, Sk]``). Inputs q [B, Sq, H*D], k, v [B, Sk, H*D] in torch layout (the q / k /
v linears' outputs), output y [B, Sq, H, D]. One parallel numba pass
(``kernels.nn.attention_heads``) per call: no transposed copies, no [B, H, Sq, Sk] score buffer,
each head's scores stay in L1.
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

    def plan(self, ins, outs, env):
        return NodePlan(kernel="nn.attention_heads")

    def run(self, ins, outs, scratch, data):
        from ...kernels.nn import attention_heads

        q, k, v = (a if a.dtype == np.float32 else a.astype(np.float32) for a in ins[:3])
        mask = ins[3] if len(ins) > 3 else None
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        if mask is None:
            m2 = _NO_MASK
        else:
            m2 = np.ascontiguousarray(mask, dtype=np.float32).reshape(-1, Sk)
        attention_heads(np.ascontiguousarray(q).reshape(-1), np.ascontiguousarray(k).reshape(-1),
                        np.ascontiguousarray(v).reshape(-1), m2, self.scale, outs[0].reshape(-1),
                        B, Sq, Sk, self.H, self.D)
