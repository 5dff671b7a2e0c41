"""``sparsedge bench compare A.json B.json``: per-case ratios between two runs.

Cases are joined on ``id`` (stable across runs and machines). For each common case the table
shows A's and B's median time, ``A/B`` (the speedup of B over A: > 1 means B is faster), and
each run's own ratio to numpy dense measured in that run (so boards with different BLAS speeds
compare by what sparsity buys on each). A geometric mean of A/B closes the table.
"""
from __future__ import annotations

import math

from .schema import load_result


def _fmt_t(s):
    if s is None:
        return "-"
    return f"{s * 1e3:.3f}ms" if s < 1 else f"{s:.2f}s"


def _fmt_r(r):
    return "-" if r is None else f"{r:.2f}x"


def compare_docs(a: dict, b: dict, *, filt: str | None = None, show_all: bool = False,
                 name_a: str = "A", name_b: str = "B") -> tuple[list[dict], str]:
    """(rows, text table) comparing two validated bench results."""
    from .machine import summary_line

    ca = {c["id"]: c for c in a["cases"]}
    cb = {c["id"]: c for c in b["cases"]}
    ids = [i for i in ca if i in cb]
    rows = []
    for i in ids:
        x, y = ca[i], cb[i]
        if filt and filt not in i:
            continue
        if not show_all and x.get("kind") != "sparsedge":
            continue
        ta, tb = x.get("median_s"), y.get("median_s")
        rows.append({"id": i, "a_s": ta, "b_s": tb, "a_over_b": (ta / tb) if ta and tb else None,
                     "a_ratio_numpy": x.get("ratio_numpy_dense"), "b_ratio_numpy": y.get("ratio_numpy_dense"),
                     "a_ratio_peer": x.get("ratio_best_peer"), "b_ratio_peer": y.get("ratio_best_peer")})
    w = max([len(r["id"]) for r in rows] + [4])
    lines = [f"{name_a}: {summary_line(a['machine'])}  [{a.get('created_utc', '?')}, {a.get('mode')}]",
             f"{name_b}: {summary_line(b['machine'])}  [{b.get('created_utc', '?')}, {b.get('mode')}]",
             f"{len(ids)} common cases ({len(ca) - len(ids)} only in {name_a}, {len(cb) - len(ids)} only in {name_b})"
             + (f"; showing {len(rows)}" if len(rows) != len(ids) else ""), "",
             f"{'case':<{w}}  {name_a + ' median':>12} {name_b + ' median':>12} {name_a + '/' + name_b:>8}  "
             f"{'xnumpy ' + name_a:>10} {'xnumpy ' + name_b:>10}  {'xpeer ' + name_a:>9} {'xpeer ' + name_b:>9}"]
    logs = []
    for r in rows:
        lines.append(f"{r['id']:<{w}}  {_fmt_t(r['a_s']):>12} {_fmt_t(r['b_s']):>12} {_fmt_r(r['a_over_b']):>8}  "
                     f"{_fmt_r(r['a_ratio_numpy']):>10} {_fmt_r(r['b_ratio_numpy']):>10}  "
                     f"{_fmt_r(r['a_ratio_peer']):>9} {_fmt_r(r['b_ratio_peer']):>9}")
        if r["a_over_b"]:
            logs.append(math.log(r["a_over_b"]))
    if logs:
        lines.append("")
        lines.append(f"geometric mean {name_a}/{name_b} over {len(logs)} cases: {math.exp(sum(logs) / len(logs)):.3f}x "
                     f"(> 1: {name_b} faster)")
    return rows, "\n".join(lines)


def compare_files(pa, pb, *, filt=None, show_all=False) -> str:
    a, b = load_result(pa), load_result(pb)
    return compare_docs(a, b, filt=filt, show_all=show_all)[1]
