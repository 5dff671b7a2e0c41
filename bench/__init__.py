"""sparsedge.bench: the benchmark suite, its peers, plots, and the demo.

Side-by-side timing needs every implementation to leave the cores idle when it returns.
OpenBLAS's worker threads busy-wait for a while after each call; interleaved with a numba
kernel they took one of the two cores and halved the kernel's measured speed (CSR 90%,
W 3072x768 x 128, 2 threads: 1.38 ms beside numpy vs 0.80 ms with short spinning; numpy's own
time did not get worse). So, unless the user set it, OpenBLAS is told to spin for the shortest
time (``OPENBLAS_THREAD_TIMEOUT=4``) before numpy is imported; the value in effect is recorded
in each result's ``settings``. onnxruntime sessions are created with spinning off for the same
reason. torch's OpenMP workers (libgomp) spin after every call too: interleaved with torch.mm,
numpy's own GEMM and the numba kernels measured up to 2.5x slower, and torch.mm itself 0.79x
numpy instead of 1.19x (W 3072x768 x 128, 2 threads, one run each way); so, unless the user set
it, ``OMP_WAIT_POLICY=PASSIVE`` is set before torch can be imported, and recorded likewise.
"""
import os as _os
import sys as _sys

OPENBLAS_SPIN_SET_BY_BENCH = False
if "numpy" not in _sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in _os.environ:
    _os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    OPENBLAS_SPIN_SET_BY_BENCH = True
OMP_WAIT_SET_BY_BENCH = False
if "torch" not in _sys.modules and "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    OMP_WAIT_SET_BY_BENCH = True
