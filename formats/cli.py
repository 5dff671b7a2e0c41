"""``sparsedge inspect FILE``: tensor table, totals, compression against dense float32, graph summary."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np

DESCRIPTION = ("Print the tensor table (name, format, block, dtype, shape, nnz, sparsity, bytes), totals,\n"
               "the compression ratio against dense float32, a graph summary and the metadata of a model file.\n"
               "The file is fully validated first (checksums included unless --no-verify).")


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a .sparsedge model file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--no-verify", action="store_true", help="skip the CRC-32 checks (faster on big files)")
    parser.add_argument("--max-rows", type=int, default=0, help="show at most this many tensor rows (0: all)")


def _structure(t) -> str:
    k = t.kind
    if k in ("bsr", "bsr_i8"):
        return f"{t.block[0]}x{t.block[1]}"
    if k == "nm":
        return f"{t.n}:{t.m}"
    if k == "dense_i8":
        return f"{t.mode[:3]}/{t.granularity[:2]}"
    if k == "lowrank":
        return f"r={t.rank}"
    if k in ("csr", "csr_i8"):
        return f"idx {t.indices.dtype}"
    return ""


def _value_dtype(t, entry) -> str:
    arrs = entry["arrays"]
    if t.kind == "dense":
        return entry["meta"].get("dtype") or arrs["values"]["dtype"]
    if t.kind == "lowrank":
        return t.dtype
    return "int8" if t.kind.endswith("_i8") else "float32"


def summarize(mf) -> dict:
    """A JSON-able summary of a loaded ModelFile (what ``inspect --json`` prints)."""
    entries = {e["name"]: e for e in mf.header["tensors"]}
    rows, tot_bytes, tot_f32, tot_numel, tot_nnz = [], 0, 0, 0, 0
    for name, t in mf.tensors.items():
        e = entries[name]
        stored = sum(a["nbytes"] for a in e["arrays"].values())
        numel = int(np.prod(t.shape, dtype=np.int64)) if len(t.shape) else 1
        vdt = _value_dtype(t, e)
        f32 = numel * 4 if vdt in ("float32", "float16", "bfloat16", "int8") or t.kind != "dense" else stored
        nnz = t.nnz
        rows.append({"name": name, "format": t.kind, "block": _structure(t), "dtype": vdt,
                     "shape": list(t.orig_shape or t.shape), "nnz": nnz,
                     "sparsity": (1.0 - nnz / numel) if numel and t.kind != "lowrank" else None,
                     "bytes": stored, "dense_f32_bytes": f32})
        tot_bytes += stored
        tot_f32 += f32
        tot_numel += numel if t.kind != "lowrank" else 0
        tot_nnz += nnz if t.kind != "lowrank" else 0
    g = mf.graph
    return {
        "file": str(mf.path), "version": f"{mf.version[0]}.{mf.version[1]}", "file_bytes": mf.file_size,
        "required_features": mf.required_features, "tensors": rows,
        "totals": {"tensors": len(rows), "bytes": tot_bytes, "dense_f32_bytes": tot_f32,
                   "compression": (tot_f32 / tot_bytes) if tot_bytes else None,
                   "sparsity": (1.0 - tot_nnz / tot_numel) if tot_numel else None},
        "graph": {"nodes": len(g.nodes), "ops": dict(Counter(n.op for n in g.nodes).most_common()),
                  "inputs": [v.to_json() for v in g.inputs], "outputs": [v.to_json() for v in g.outputs],
                  "act_quant": g.act_quant},
        "metadata": mf.metadata,
    }


def _fmt_bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _vi(v) -> str:
    return f"{v['name']}: {v['dtype']}[{', '.join(str(d) for d in v['shape'])}]"


def render(s: dict, max_rows: int = 0) -> str:
    cols = ("name", "format", "block", "dtype", "shape", "nnz", "sparsity", "bytes")
    rows = []
    for r in s["tensors"]:
        rows.append((r["name"], r["format"], r["block"], r["dtype"], "x".join(map(str, r["shape"])) or "scalar",
                     str(r["nnz"]), "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%",
                     _fmt_bytes(r["bytes"])))
    shown = rows if not max_rows or len(rows) <= max_rows else rows[:max_rows]
    w = [max([len(c)] + [len(r[i]) for r in shown]) for i, c in enumerate(cols)]
    right = {5, 6, 7}
    line = lambda r: "  ".join(x.rjust(w[i]) if i in right else x.ljust(w[i]) for i, x in enumerate(r)).rstrip()  # noqa
    out = [f"{s['file']}: sparsedge model file v{s['version']}, {_fmt_bytes(s['file_bytes'])}",
           f"required features: {', '.join(s['required_features']) or '-'}", "", line(cols),
           line(tuple("-" * x for x in w))]
    out += [line(r) for r in shown]
    if len(shown) < len(rows):
        out.append(f"... {len(rows) - len(shown)} more tensors (--max-rows 0 shows all)")
    t = s["totals"]
    comp = "-" if t["compression"] is None else f"{t['compression']:.2f}x"
    sp = "-" if t["sparsity"] is None else f"{100 * t['sparsity']:.1f}%"
    out += ["", f"total: {t['tensors']} tensors, {_fmt_bytes(t['bytes'])} stored vs "
                f"{_fmt_bytes(t['dense_f32_bytes'])} as dense float32: compression {comp}; "
                f"overall sparsity {sp} (low-rank excluded)"]
    g = s["graph"]
    out += ["", f"graph: {g['nodes']} nodes; ops: " + ", ".join(f"{k} x{v}" for k, v in g["ops"].items()),
            "inputs:  " + "; ".join(_vi(v) for v in g["inputs"]),
            "outputs: " + "; ".join(_vi(v) for v in g["outputs"])]
    if g["act_quant"]:
        out.append("act_quant: " + "; ".join(f"{k}: scale={v['scale']:.6g} zp={v['zero_point']} {v['dtype']}"
                                             for k, v in g["act_quant"].items()))
    if s["metadata"]:
        out += ["", "metadata:"]
        for k, v in s["metadata"].items():
            txt = json.dumps(v, sort_keys=True)
            out.append(f"  {k}: {txt if len(txt) <= 200 else txt[:197] + '...'}")
    return "\n".join(out)


def run(args) -> int:
    from .modelfile import read_model

    mf = read_model(args.file, verify_checksums=not args.no_verify)
    try:
        s = summarize(mf)
    finally:
        mf.close()
    if args.json:
        print(json.dumps(s, indent=1))
    else:
        print(render(s, args.max_rows))
    return 0
