"""Shape ops. reshape / flatten / squeeze / unsqueeze are views (no buffer, no copy);
transpose / slice / expand / concat copy into the planned output (keeps every buffer contiguous)."""
from __future__ import annotations

import numpy as np

from . import Op, register
from ._common import split0


@register("reshape", "flatten", "squeeze", "unsqueeze")
class View(Op):
    view = True

    def default_kernel(self):
        return "view"

    def view_of(self, ins, out_shapes):
        return [ins[0].reshape(out_shapes[0])]


@register("transpose")
class Transpose(Op):
    def run(self, ins, outs, scratch, data):
        y, xt = outs[0], ins[0].transpose(self.attrs["perm"])
        split0(y, [xt], lambda yp, p: np.copyto(yp, p[0]))


@register("slice")
class Slice(Op):
    def run(self, ins, outs, scratch, data):
        x = ins[0]
        sl = [slice(None)] * x.ndim
        sl[self.attrs["axis"]] = slice(self.attrs["start"], self.attrs["end"], self.attrs["step"])
        np.copyto(outs[0], x[tuple(sl)])


@register("expand")
class Expand(Op):
    def run(self, ins, outs, scratch, data):
        np.copyto(outs[0], np.broadcast_to(ins[0], outs[0].shape))


@register("concat")
class Concat(Op):
    def run(self, ins, outs, scratch, data):
        y = outs[0]
        xs = [x if x.dtype == y.dtype else x.astype(y.dtype) for x in ins]
        np.concatenate(xs, axis=self.attrs["axis"], out=y)
