"""Peers measured side by side with sparsedge: each used only when installed.

Names (the ``impl`` of peer cases in the JSON):
  numpy_dense  numpy ``@`` on the dense float32 matrix (BLAS; always present, the baseline)
  scipy_csr    ``scipy.sparse.csr_matrix @ X`` (sparse cases)
  torch_dense  ``torch.mm`` (threads: torch.set_num_threads)
  torch_csr    ``torch.sparse_csr_tensor @ X`` (sparse cases)
  ort_f32      onnxruntime float32 MatMul / Conv, model built with onnx.helper from the same weights
  ort_int8     the same model through ``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights,
               activations quantized at run time: MatMulInteger / ConvInteger)

Layouts: numpy / scipy / torch compute ``Y[out, N] = W @ X[in, N]`` like the kernels; onnxruntime
gets its natural ``X^T[N, in] @ W^T[in, out]`` (the transposed copies are made once, untimed).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import tempfile

import numpy as np

PEER_ORDER = ("numpy_dense", "scipy_csr", "torch_dense", "torch_csr", "ort_f32", "ort_int8")
SPARSE_ONLY = ("scipy_csr", "torch_csr")


def _try(mod: str):
    try:
        return importlib.import_module(mod)
    except Exception:
        return None


def installed() -> dict:
    """``{peer name: version or None}`` (None: not installed, the peer is skipped)."""
    sp, th, ort, ox = _try("scipy"), _try("torch"), _try("onnxruntime"), _try("onnx")
    ortv = ort.__version__ if (ort is not None and ox is not None) else None
    return {"numpy_dense": np.__version__, "scipy_csr": getattr(sp, "__version__", None),
            "torch_dense": getattr(th, "__version__", None), "torch_csr": getattr(th, "__version__", None),
            "ort_f32": ortv, "ort_int8": ortv if _try("onnxruntime.quantization") is not None else None}


def aligned_empty(shape, dtype=np.float32, align=64) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an ``align``-byte boundary: the
    runtime hands kernels activations from its arena, whose buffers are 64-byte aligned
    (runtime/planner.py ALIGN); numpy's own allocation is only 16-byte aligned."""
    dt = np.dtype(dtype)
    n = int(np.prod(shape)) * dt.itemsize
    raw = np.empty(n + align, np.uint8)
    o = (-raw.ctypes.data) % align
    return raw[o:o + n].view(dt).reshape(shape)


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Limit numpy's BLAS threads to ``n`` (threadpoolctl when installed; else a no-op)."""
    tpc = _try("threadpoolctl")
    if n is None or tpc is None:
        yield
        return
    with tpc.threadpool_limits(limits=int(n), user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------------
# onnx helpers
def _onnx_matmul_model(wt: np.ndarray, n_in: int, name="W"):
    """ONNX model: y[N, out] = x[N, in] @ wt[in, out]; batch dim symbolic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", wt.shape[1]])
    init = numpy_helper.from_array(np.ascontiguousarray(wt, dtype=np.float32), name)
    node = helper.make_node("MatMul", ["x", name], ["y"], name="matmul")
    g = helper.make_graph([node], "gemm", [x], [y], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 9)
    return m


def _onnx_conv_model(w4: np.ndarray, stride=1, pad=1):
    """ONNX model: NCHW Conv with weight w4 [out, in, kh, kw], no bias."""
    import onnx  # noqa: F401
    from onnx import TensorProto, helper, numpy_helper

    co, ci, kh, kw = w4.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ci, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", co, "oh", "ow"])
    init = numpy_helper.from_array(np.ascontiguousarray(w4, dtype=np.float32), "W")
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="conv", kernel_shape=[kh, kw],
                            strides=[stride, stride], pads=[pad, pad, pad, pad])
    g = helper.make_graph([node], "conv", [x], [y], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = min(m.ir_version, 9)
    return m


def ort_session(model_or_path, threads: int | None):
    """An onnxruntime CPU InferenceSession with ``threads`` intra-op threads (1 inter-op)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no spin-waiting between calls: spinning intra-op threads would steal the cores from the
    # implementation timed next in the interleaved rounds (a real app runs other work too)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def quantize_dynamic_file(src: str, dst: str, per_channel: bool = False) -> str:
    """onnxruntime dynamic int8 quantization (QInt8 weights) of the ONNX file ``src`` into ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel)
    return dst


def _ort_pair(model, tmpdir: str, tag: str, threads, want_int8: bool):
    """(f32 session, int8 session or None) for an in-memory ONNX model."""
    import onnx

    f32 = ort_session(model, threads)
    i8 = None
    if want_int8:
        src = os.path.join(tmpdir, f"{tag}.onnx")
        dst = os.path.join(tmpdir, f"{tag}.int8.onnx")
        onnx.save(model, src)
        quantize_dynamic_file(src, dst)
        i8 = ort_session(dst, threads)
    return f32, i8


def _cycler(items):
    """A zero-arg function returning the next item of ``items`` (cycled)."""
    state = [0]
    n = len(items)

    def nxt():
        i = state[0]
        state[0] = i + 1 if i + 1 < n else 0
        return items[i]
    return nxt


# ---------------------------------------------------------------------------------------------
def gemm_peers(pool: list, x: np.ndarray, threads: int | None, *, sparse: bool, which=None,
               workdir: str | None = None) -> dict:
    """Callables computing ``W @ x`` for each installed peer, cycling over the weight ``pool``.

    pool: list of dense float32 ``[out, in]`` matrices (length 1 = weights hot in cache; longer
    = a pool cycled to stream weights from DRAM). x: float32 ``[in, N]``.
    ``which``: subset of peer names (default all installed); sparse-only peers need ``sparse``.
    Returns ``{peer: fn()}``; every fn writes into a preallocated output where the peer allows.
    """
    have = installed()
    names = [p for p in PEER_ORDER if have.get(p) and (which is None or p in which)
             and (sparse or p not in SPARSE_ONLY)]
    out_dim, n = pool[0].shape[0], x.shape[1]
    fns = {}
    y = aligned_empty((out_dim, n))  # 64-byte aligned like sparsedge's output (the runtime's arena)
    if "numpy_dense" in names:
        nw = _cycler(pool)
        fns["numpy_dense"] = lambda: np.matmul(nw(), x, out=y)
    if "scipy_csr" in names:
        import scipy.sparse as sps

        mats = [sps.csr_matrix(w) for w in pool]
        sw = _cycler(mats)
        fns["scipy_csr"] = lambda: sw() @ x
    if "torch_dense" in names or "torch_csr" in names:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        xt = torch.from_numpy(x)
        yt = torch.empty((out_dim, n), dtype=torch.float32)
        if "torch_dense" in names:
            tw = _cycler([torch.from_numpy(w) for w in pool])
            fns["torch_dense"] = lambda: torch.mm(tw(), xt, out=yt)
        if "torch_csr" in names:
            tc = _cycler([torch.from_numpy(w).to_sparse_csr() for w in pool])
            fns["torch_csr"] = lambda: torch.sparse.mm(tc(), xt) if n > 1 else tc() @ xt
    if "ort_f32" in names or "ort_int8" in names:
        xT = np.ascontiguousarray(x.T)
        own = workdir is None
        tmp = tempfile.mkdtemp(prefix="sparsedge-bench-ort-") if own else workdir
        f32s, i8s = [], []
        for i, w in enumerate(pool):
            a, b = _ort_pair(_onnx_matmul_model(np.ascontiguousarray(w.T), w.shape[1]), tmp, f"mm{i}", threads,
                             "ort_int8" in names)
            f32s.append(a)
            i8s.append(b)
        feeds = {"x": xT}
        if "ort_f32" in names:
            of = _cycler(f32s)
            fns["ort_f32"] = lambda: of().run(None, feeds)
        if "ort_int8" in names:
            oi = _cycler(i8s)
            fns["ort_int8"] = lambda: oi().run(None, feeds)
    return fns


def conv_peers(w4: np.ndarray, x4: np.ndarray, threads: int | None, *, sparse: bool, which=None,
               workdir: str | None = None) -> dict:
    """Callables for a stride-1 'same' k x k convolution of NCHW ``x4`` by ``w4 [out, in, k, k]``.

    numpy_dense: im2col (sliding_window_view copy) + BLAS; scipy_csr: the same im2col + CSR @;
    torch_dense: torch.nn.functional.conv2d (mkldnn); onnxruntime: Conv / ConvInteger.
    """
    have = installed()
    names = [p for p in PEER_ORDER if have.get(p) and (which is None or p in which)
             and (sparse or p not in SPARSE_ONLY) and p != "torch_csr"]
    co, ci, kh, kw = w4.shape
    pad = kh // 2
    w2 = np.ascontiguousarray(w4.reshape(co, -1))
    fns = {}
    if "numpy_dense" in names or "scipy_csr" in names:
        xb = np.pad(x4, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        b, _, h, wd = x4.shape
        cols = np.empty((ci * kh * kw, b * h * wd), np.float32)

        def im2col():
            v = np.lib.stride_tricks.sliding_window_view(xb, (kh, kw), axis=(2, 3))  # b, ci, h, w, kh, kw
            cols.reshape(ci, kh, kw, b, h, wd)[...] = v.transpose(1, 4, 5, 0, 2, 3)
            return cols
        y = np.empty((co, b * h * wd), np.float32)
        if "numpy_dense" in names:
            fns["numpy_dense"] = lambda: np.matmul(w2, im2col(), out=y)
        if "scipy_csr" in names:
            import scipy.sparse as sps

            wc = sps.csr_matrix(w2)
            fns["scipy_csr"] = lambda: wc @ im2col()
    if "torch_dense" in names:
        import torch
        import torch.nn.functional as F

        if threads:
            torch.set_num_threads(int(threads))
        tx, tw = torch.from_numpy(x4), torch.from_numpy(np.ascontiguousarray(w4))
        fns["torch_dense"] = lambda: F.conv2d(tx, tw, padding=pad)
    if "ort_f32" in names or "ort_int8" in names:
        tmp = workdir or tempfile.mkdtemp(prefix="sparsedge-bench-ort-")
        a, b_ = _ort_pair(_onnx_conv_model(w4, 1, pad), tmp, "conv", threads, "ort_int8" in names)
        feeds = {"x": x4}
        if "ort_f32" in names:
            fns["ort_f32"] = lambda: a.run(None, feeds)
        if "ort_int8" in names:
            fns["ort_int8"] = lambda: b_.run(None, feeds)
    return fns
