"""Side-by-side timing: every implementation of a case group measured in alternation.

Why not one pytest-benchmark run per implementation: pytest-benchmark times one function's
rounds back to back, so on a shared or thermally throttling board a slow minute lands on
whichever implementation ran then. Ratios are the product here, so the implementations of a
group are interleaved round by round (rotating the order every round) and compared by medians.
The statistics themselves are pytest-benchmark's (``pytest_benchmark.stats.Stats``) when it
is installed (extra ``test``), and the JSON carries them in pytest-benchmark's field names.
"""
from __future__ import annotations

import statistics
import time

try:  # pytest-benchmark's statistics (same fields as its --benchmark-json output)
    from pytest_benchmark.stats import Stats as _PBStats
except Exception:  # pragma: no cover - optional
    _PBStats = None

STAT_FIELDS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "rounds", "ops")


def stats_of(samples: list[float]) -> dict:
    """Statistics of per-call times in seconds (pytest-benchmark's names)."""
    if _PBStats is not None:
        s = _PBStats()
        for v in samples:
            s.update(v)
        d = s.as_dict()
        return {k: (float(d[k]) if k != "rounds" else int(d[k])) for k in STAT_FIELDS}
    xs = sorted(samples)
    n = len(xs)
    q = statistics.quantiles(xs, n=4) if n >= 2 else [xs[0]] * 3
    med = statistics.median(xs)
    return {"min": xs[0], "max": xs[-1], "mean": statistics.mean(xs),
            "stddev": statistics.stdev(xs) if n > 1 else 0.0, "median": med, "iqr": q[2] - q[0],
            "q1": q[0], "q3": q[2], "rounds": n, "ops": 1.0 / statistics.mean(xs)}


def interleaved(fns: dict, *, rounds: int = 15, min_rounds: int = 5, round_time: float = 0.01,
                budget: float = 3.0, warmup: int = 1) -> dict:
    """Time ``{name: callable()}`` side by side. Returns ``{name: stats dict}`` of seconds per call.

    Each callable is warmed up (``warmup`` calls, then three timed calls: the fastest sizes its
    inner loop so one round lasts about ``round_time`` s); then ``rounds`` rounds run each callable's inner
    loop once, in an order rotated every round. The round count is cut (not below
    ``min_rounds``) so the whole group stays near ``budget`` seconds.
    """
    names = list(fns)
    loops = {}
    est = {}
    for n in names:
        f = fns[n]
        for _ in range(warmup):
            f()
        dt = float("inf")
        for _ in range(3):  # size from the fastest of 3 calls: one cold call (caches / threads
            t0 = time.perf_counter()  # left cold by the previous implementation) gave too few loops
            f()
            dt = min(dt, time.perf_counter() - t0)
        dt = max(dt, 1e-7)
        loops[n] = max(1, min(1000, int(round_time / dt)))
        est[n] = dt * loops[n]
    per_round = sum(est.values())
    r = max(min_rounds, min(rounds, int(budget / max(per_round, 1e-9))))
    samples = {n: [] for n in names}
    k = len(names)
    for i in range(r):
        order = names[i % k:] + names[:i % k] if k else names
        for n in order:
            f, m = fns[n], loops[n]
            t0 = time.perf_counter()
            for _ in range(m):
                f()
            samples[n].append((time.perf_counter() - t0) / m)
    out = {}
    for n in names:
        s = stats_of(samples[n])
        s["loops"] = loops[n]
        out[n] = s
    return out
