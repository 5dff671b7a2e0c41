"""``sparsedge bench report A.json [--plot OUT.png] [--markdown OUT.md]``: tables and plots.

Tables (markdown): kernels per shape and weight pattern, the fastest sparsedge row of each
(format, dtype) with its median, ratio to numpy dense and to the best peer of that group;
models per model and compression level; cold start. The plot: per kernel shape, speedup over
numpy dense against sparsity, one line per (format, dtype) (its fastest row at each sparsity,
peers dashed); then useful GFLOP/s of the fastest rows against the measured FMA peak; then the
models' speedups over onnxruntime float32.
"""
from __future__ import annotations

from collections import defaultdict

from .schema import load_result


def _family(c) -> str:
    if c.get("kind") == "peer":
        return c["impl"]
    f = c.get("fmt", "?")
    if c.get("structure") == "block" and c.get("block"):
        f += "_{}x{}".format(*c["block"])
    return f + ("" if c.get("dtype") == "float32" or f.endswith("_i8") else f"_{c.get('dtype')}")


def best_kernel_cases(doc) -> dict:
    """{(shape_id, pattern, family): fastest case} over successful kernel cases."""
    best = {}
    for c in doc["cases"]:
        if c.get("suite") != "kernels" or "error" in c or not c.get("median_s"):
            continue
        if c.get("kind") == "sparsedge" and c.get("ok") is False:
            continue
        k = (c["shape_id"], c["pattern"], _family(c))
        if k not in best or c["median_s"] < best[k]["median_s"]:
            best[k] = c
    return best


def _r(x):
    return "-" if x is None else f"{x:.2f}x"


def _ms(s):
    return "-" if s is None else (f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}")


def kernel_table(doc, filt=None) -> str:
    best = best_kernel_cases(doc)
    out = []
    shapes = []
    for (sid, _, _) in best:
        if sid not in shapes:
            shapes.append(sid)
    for sid in shapes:
        label = next((c.get("shape") for c in doc["cases"] if c.get("shape_id") == sid), {})
        out.append(f"\n**{sid}** (W {label.get('out')}x{label.get('in')}, N={label.get('n')}"
                   + (f", pool of {label.get('pool')} matrices" if label.get("pool", 1) > 1 else "") + ")\n")
        out.append("| pattern | kernel (fastest of its format) | median ms | x numpy dense | x best peer (which) | GFLOP/s | % peak |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        rows = [c for (s, p, f), c in best.items() if s == sid and c["kind"] == "sparsedge"]
        rows.sort(key=lambda c: (c.get("sparsity", 0), c["pattern"], c["impl"]))
        for c in rows:
            if filt and filt not in c["id"]:
                continue
            pf = c.get("peak_fraction")
            out.append(f"| {c['pattern']} | {c['impl']} | {_ms(c['median_s'])} | {_r(c.get('ratio_numpy_dense'))} | "
                       f"{_r(c.get('ratio_best_peer'))} ({c.get('best_peer')}) | {c.get('useful_gflops', 0):.1f} | "
                       f"{'-' if pf is None else f'{pf * 100:.0f}%'} |")
        peers = {}
        for (s, p, f), c in best.items():
            if s == sid and c["kind"] == "peer" and p == "dense":
                peers[f] = c
        if peers:
            out.append("\npeers on the dense weights: " + ", ".join(
                f"{k} {_ms(v['median_s'])} ms ({_r(v.get('ratio_numpy_dense'))})" for k, v in peers.items()))
    return "\n".join(out)


def model_table(doc, filt=None) -> str:
    rows = [c for c in doc["cases"] if c.get("suite") == "models" and (not filt or filt in c["id"])]
    if not rows:
        return ""
    out = ["| model | impl | median ms | x ort f32 | x ort int8 | x numpy-dense sparsedge | accuracy / max err | file MB | arena MB | peak RSS MB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in rows:
        if "error" in c:
            out.append(f"| {c.get('model')} | {c['impl']} | error: {c['error'][:60]} | | | | | | | |")
            continue
        acc = c.get("accuracy")
        err = c.get("max_abs_err")
        q = f"{acc * 100:.1f}%" if acc is not None else (f"{err:.2g}" if err is not None else "-")
        mb = lambda v: "-" if v is None else f"{v / 2 ** 20:.1f}"  # noqa: E731
        out.append(f"| {c.get('model')} | {c['impl']} | {_ms(c.get('median_s'))} | {_r(c.get('ratio_ort_f32'))} | "
                   f"{_r(c.get('ratio_ort_int8'))} | {_r(c.get('ratio_sparsedge_dense'))} | {q} | {mb(c.get('file_bytes'))} | "
                   f"{mb(c.get('arena_bytes'))} | {mb(c.get('peak_rss_bytes'))} |")
    return "\n".join(out)


def cold_table(doc) -> str:
    rows = [c for c in doc["cases"] if c.get("suite") == "coldstart"]
    if not rows:
        return ""
    by = defaultdict(dict)
    for c in rows:
        by[c["impl"]][c["phase"]] = c
    out = ["| kernel | compile (empty cache) s | load (warm cache) s |", "|---|---:|---:|"]
    for k, d in by.items():
        f = lambda p: "-" if p not in d or "median_s" not in d[p] else f"{d[p]['median_s']:.3f}"  # noqa: E731
        name = k if k != "all" else f"**all ({d.get('load', d.get('compile', {})).get('n_kernels', '?')} kernels, incl. imports)**"
        out.append(f"| {name} | {f('compile')} | {f('load')} |")
    return "\n".join(out)


def text_summary(doc, filt=None) -> str:
    from .machine import summary_line

    parts = [f"# sparsedge bench ({doc.get('mode')}, {doc.get('created_utc')})", "", summary_line(doc["machine"])]
    kt = kernel_table(doc, filt)
    if kt:
        parts += ["", "## Kernels", kt]
    ct = cold_table(doc)
    if ct:
        parts += ["", "## Cold start", ct]
    mt = model_table(doc, filt)
    if mt:
        parts += ["", "## Models", mt]
    if doc.get("skipped"):
        reasons = defaultdict(int)
        for s in doc["skipped"]:
            reasons[s["reason"]] += 1
        parts += ["", "skipped: " + "; ".join(f"{v} x {k}" for k, v in reasons.items())]
    return "\n".join(parts)


def plot(doc, out_png: str) -> None:
    """Draw speedup vs sparsity per format (one panel per kernel shape), GFLOP/s vs peak, models."""
    from ..errors import InputError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        raise InputError(f"--plot needs matplotlib (pip install 'sparsedge[plot]'): {e}", field="plot") from None
    from .machine import summary_line

    best = best_kernel_cases(doc)
    shapes = []
    for (sid, _, _) in best:
        if sid not in shapes:
            shapes.append(sid)
    models = [c for c in doc["cases"] if c.get("suite") == "models" and c.get("median_s")]
    n = len(shapes) + 1 + (1 if models else 0)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    axl = axes.ravel()
    for ax, sid in zip(axl, shapes):
        fam = defaultdict(list)
        for (s, p, f), c in best.items():
            if c.get("kind") == "peer" and c.get("structure") not in ("dense", "unstructured"):
                continue  # peers as lines over the unstructured sweep only
            if s == sid and c.get("ratio_numpy_dense") and c.get("structure") != "lowrank":
                fam[f].append((c["sparsity"], c["ratio_numpy_dense"], c["kind"]))
        for f, pts in sorted(fam.items()):
            pts.sort()
            xs = [p[0] * 100 for p in pts]
            ys = [p[1] for p in pts]
            peer = pts[0][2] == "peer"
            if peer and f == "numpy_dense":
                continue
            ax.plot(xs, ys, "--" if peer else "-", marker="o" if not peer else ".", label=f, alpha=0.6 if peer else 1)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(sid, fontsize=10)
        ax.set_xlabel("sparsity %")
        ax.set_ylabel("speedup vs numpy dense")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    # achieved vs peak
    ax = axl[len(shapes)]
    peak = (doc["machine"].get("fma_peak") or {}).get("gflops")
    pts = [(f"{c['shape_id']}/{c['pattern']}\n{c['impl']}", c.get("useful_gflops", 0))
           for (s, p, f), c in best.items()
           if c["kind"] == "sparsedge" and c.get("sparsity") in (0.0, 0.9) and c.get("shape", {}).get("n", 1) > 1]
    pts.sort(key=lambda t: -t[1])
    pts = pts[:14]
    if pts:
        ax.barh(range(len(pts)), [p[1] for p in pts])
        ax.set_yticks(range(len(pts)))
        ax.set_yticklabels([p[0] for p in pts], fontsize=5)
        ax.invert_yaxis()
    if peak:
        ax.axvline(peak, color="r", lw=1, label=f"FMA peak {peak:.0f}")
        ax.axvline(peak / 2, color="r", lw=0.6, ls="--", label="50% peak")
        ax.axvline(peak / 4, color="r", lw=0.6, ls=":", label="25% peak")
        ax.legend(fontsize=6)
    ax.set_xlabel("useful GFLOP/s (2 nnz N / t)")
    ax.set_title("achieved vs FMA peak (0% / 90%)", fontsize=10)
    if models:
        ax = axl[len(shapes) + 1]
        labels = [f"{c.get('model')}/{c['impl']}" for c in models]
        vals = [c.get("ratio_ort_f32") or 0 for c in models]
        ax.barh(range(len(models)), vals)
        ax.set_yticks(range(len(models)))
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xlabel("speedup vs onnxruntime float32")
        ax.set_title("models", fontsize=10)
    for ax in axl[n:]:
        ax.axis("off")
    fig.suptitle(summary_line(doc["machine"]) + f"  [{doc.get('created_utc')}]", fontsize=8)
    fig.tight_layout()
    import os

    tmp = out_png + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)


def report_file(path, *, plot: str | None = None, markdown: str | None = None, filt=None) -> str:
    doc = load_result(path)
    text = text_summary(doc, filt)
    if markdown:
        import os

        tmp = markdown + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, markdown)
    if plot:
        globals()["plot"](doc, plot)
        text += f"\n\nplot written to {plot}"
    return text
