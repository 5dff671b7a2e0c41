"""Run numpy / BLAS work on the Session's threads without OpenBLAS's own thread pool.

Why: when a Session runs numba kernels on k > 1 threads, the runtime sets OpenBLAS to 1 thread
(``threads.blas_policy``: OpenBLAS workers busy-wait after each call and thrash against numba's
workers). That left every BLAS call (dense linears and convs, attention matmuls) and every numpy
pass (softmax, adds) on one core: a dense BERT ran at about half of onnxruntime's speed on 2 cores.
Here the caller splits such work into k row ranges and runs k-1 of them on a small pool of
Python threads (numpy and OpenBLAS release the GIL; one-thread OpenBLAS calls from several threads
at once are safe), the calling thread doing the first range. Idle pool threads block on a queue
(no spinning), so they never steal cores from numba.

``set_threads(k)`` is called by ``Session.run`` in the calling thread (thread-local, like
numba's thread count); ``split(n, fn, work)`` runs ``fn(i0, i1)`` over ``[0, n)``.
"""
from __future__ import annotations

import queue
import threading

_tls = threading.local()
_pool_lock = threading.Lock()
_workers: list = []
_tasks: queue.SimpleQueue = queue.SimpleQueue()

# below this much work (multiply-adds or elements touched) a split costs more than it saves
# (a hand-off to a pool thread is ~20-50 us)
MIN_WORK = 1 << 20


def set_threads(k: int) -> None:
    """Threads the calling thread may use for split work (1 = never split)."""
    _tls.k = max(1, int(k))


def threads() -> int:
    return getattr(_tls, "k", 1)


def _worker():
    while True:
        fn, a, b, done = _tasks.get()
        try:
            fn(a, b)
        except BaseException as e:  # handed back to the caller
            done.err = e
        finally:
            done.release()


class _Done:
    __slots__ = ("sem", "err")

    def __init__(self):
        self.sem = threading.Semaphore(0)
        self.err = None

    def release(self):
        self.sem.release()


def _ensure_workers(n: int) -> None:
    if len(_workers) >= n:
        return
    with _pool_lock:
        while len(_workers) < n:
            t = threading.Thread(target=_worker, name=f"sparsedge-par-{len(_workers)}", daemon=True)
            t.start()
            _workers.append(t)


def split(n: int, fn, work: float = float("inf"), k: int | None = None) -> None:
    """Call ``fn(i0, i1)`` for contiguous ranges covering ``[0, n)``: on up to ``k`` threads
    (default ``threads()``) when ``work`` >= ``MIN_WORK``, else once in the calling thread."""
    k = threads() if k is None else k
    k = min(k, n)
    if k <= 1 or work < MIN_WORK:
        if n > 0:
            fn(0, n)
        return
    _ensure_workers(k - 1)
    bounds = [(i * n) // k for i in range(k + 1)]
    done = _Done()
    for i in range(1, k):
        _tasks.put((fn, bounds[i], bounds[i + 1], done))
    err = None
    try:
        fn(bounds[0], bounds[1])
    except BaseException as e:
        err = e
    for _ in range(k - 1):
        done.sem.acquire()
    if err is not None:
        raise err
    if done.err is not None:
        raise done.err

