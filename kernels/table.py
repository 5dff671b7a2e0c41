"""The kernel table: one row per kernel. Tests, benchmarks and the runtime's selector iterate it.

Adding a kernel = one module in ``kernels/`` that defines ``KERNELS = [KernelSpec(...), ...]``
plus its module name in ``_MODULES`` below.

Activation layout for weight GEMMs (the project contract): ``Y[out, N] = W[out, in] @ X[in, N]``
with X and Y C-contiguous float32, i.e. feature-major ("channel-major") so the inner loops
run contiguously over N (tokens, or pixels of a 1x1 conv). N = 1 is the batch-1 case.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

# Fused epilogue activation codes, shared by every GEMM/conv kernel (ints: cheap in numba).
ACT_NONE, ACT_RELU, ACT_RELU6, ACT_GELU, ACT_GELU_TANH, ACT_SILU, ACT_HARDSWISH, ACT_SIGMOID, ACT_CLAMP = range(9)
ACTIVATIONS = {"none": ACT_NONE, "relu": ACT_RELU, "relu6": ACT_RELU6, "gelu": ACT_GELU,
               "gelu_tanh": ACT_GELU_TANH, "silu": ACT_SILU, "hardswish": ACT_HARDSWISH,
               "sigmoid": ACT_SIGMOID, "clamp": ACT_CLAMP}


@dataclass(frozen=True)
class KernelSpec:
    name: str  # unique, e.g. "csr_f32_spmm"
    op: str  # "gemm" (Y = W @ X), "gemv" (N = 1), "dwconv", "layernorm", ...
    fmt: str  # weight format kind it consumes ("dense", "csr", "bsr", "nm", "lowrank", ...)
    dtype: str  # weight value dtype ("float32" / "int8")
    block: tuple | None = None  # BSR (r, c) or N:M (n, m); None otherwise
    cpu: tuple = ()  # required CPU features (names as in kernels/cpu.py), e.g. ("avx512_vnni",)
    # prepare(weight_format) -> packed: one-time (load-time) repack, may return the arrays as-is
    prepare: Callable | None = None
    # run(packed, x, y, bias, act, act_lo, act_hi, residual) -> None; writes y in place
    run: Callable | None = None
    # reference(weight_format, x, bias, act, act_lo, act_hi, residual) -> y   (plain numpy)
    reference: Callable | None = None
    min_n: int = 1  # smallest N this row is meant for
    max_n: int | None = None  # largest N (e.g. 1 for gemv rows)
    notes: str = ""
    extra: dict = field(default_factory=dict)


_MODULES: list[str] = [f"sparsedge.kernels.{m}" for m in ("dense", "csr", "bsr", "nm", "int8", "conv")]


def all_kernels() -> list[KernelSpec]:
    """Every registered kernel row (imports the kernel modules on first call)."""
    rows: list[KernelSpec] = []
    for m in _MODULES:
        rows.extend(importlib.import_module(m).KERNELS)
    names = [r.name for r in rows]
    assert len(names) == len(set(names)), "duplicate kernel names"
    return rows


def by_name(name: str) -> KernelSpec:
    for r in all_kernels():
        if r.name == name:
            return r
    raise KeyError(name)
