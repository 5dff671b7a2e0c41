"""The bench JSON schema (``bench/schema.json``, JSON Schema 2020-12) and a tiny validator.

The validator implements the subset the schema uses: ``type`` (one or a list; "integer"
excludes bools), ``properties``, ``required``, ``items``, ``enum``, ``minimum``, ``maximum``,
``exclusiveMinimum``, ``additionalProperties`` (bool or schema) and local ``$ref``
(``#/$defs/name``). No jsonschema dependency; any full validator accepts the same files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"
SCHEMA_ID = "sparsedge-bench/1"


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _resolve(root: dict, ref: str) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref supported: {ref}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def errors(doc, schema: dict | None = None, *, limit: int = 50) -> list[str]:
    """All validation errors of ``doc`` (``"path: message"``), empty when valid."""
    root = schema or load_schema()
    out: list[str] = []

    def walk(v, s, path):
        if len(out) >= limit:
            return
        if "$ref" in s:
            s = _resolve(root, s["$ref"])
        t = s.get("type")
        if t is not None:
            ts = t if isinstance(t, list) else [t]
            if not any(_TYPES[x](v) for x in ts):
                out.append(f"{path or '$'}: expected {'/'.join(ts)}, got {type(v).__name__}")
                return
        if "enum" in s and v not in s["enum"]:
            out.append(f"{path or '$'}: {v!r} not one of {s['enum']}")
        if _TYPES["number"](v):
            if isinstance(v, float) and not math.isfinite(v):
                out.append(f"{path or '$'}: not finite ({v})")
            if "minimum" in s and v < s["minimum"]:
                out.append(f"{path or '$'}: {v} < minimum {s['minimum']}")
            if "maximum" in s and v > s["maximum"]:
                out.append(f"{path or '$'}: {v} > maximum {s['maximum']}")
            if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
                out.append(f"{path or '$'}: {v} <= exclusiveMinimum {s['exclusiveMinimum']}")
        if isinstance(v, dict):
            for r in s.get("required", ()):
                if r not in v:
                    out.append(f"{path or '$'}: missing required {r!r}")
            props = s.get("properties", {})
            addl = s.get("additionalProperties", True)
            for k, sub in v.items():
                if k in props:
                    walk(sub, props[k], f"{path}.{k}")
                elif addl is False:
                    out.append(f"{path or '$'}: unexpected key {k!r}")
                elif isinstance(addl, dict):
                    walk(sub, addl, f"{path}.{k}")
        if isinstance(v, list) and "items" in s:
            for i, sub in enumerate(v):
                walk(sub, s["items"], f"{path}[{i}]")

    walk(doc, root, "")
    if isinstance(doc, dict) and isinstance(doc.get("cases"), list):
        seen = set()
        for i, c in enumerate(doc["cases"]):
            cid = c.get("id") if isinstance(c, dict) else None
            if cid in seen:
                out.append(f".cases[{i}].id: duplicate id {cid!r}")
            seen.add(cid)
    return out


def validate(doc, schema: dict | None = None) -> None:
    """Raise ``InputError`` listing the first errors unless ``doc`` is a valid bench result."""
    errs = errors(doc, schema)
    if errs:
        from sparsedge.errors import InputError

        more = f" (and {len(errs) - 10} more)" if len(errs) > 10 else ""
        raise InputError("not a valid sparsedge bench result: " + "; ".join(errs[:10]) + more, field="schema")


def load_result(path) -> dict:
    """Read and validate a bench JSON file (``InputError`` naming the file otherwise)."""
    from sparsedge.errors import InputError

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read bench JSON: {e}", file=str(path)) from None
    errs = errors(doc)
    if errs:
        raise InputError("not a valid sparsedge bench result: " + "; ".join(errs[:10]), file=str(path))
    return doc


def sanitize(obj):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None, tuples to lists."""
    try:
        import numpy as np
    except Exception:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv=None) -> int:
    """``python -m sparsedge.bench.schema FILE.json ...``: validate bench results (exit 1 on errors)."""
    import sys

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m sparsedge.bench.schema FILE.json ...", file=sys.stderr)
        return 2
    rc = 0
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"{p}: cannot read: {e}", file=sys.stderr)
            rc = 1
            continue
        errs = errors(doc)
        if errs:
            rc = 1
            print(f"{p}: INVALID ({len(errs)} errors)", file=sys.stderr)
            for e in errs[:20]:
                print(f"  {e}", file=sys.stderr)
        else:
            print(f"{p}: valid {SCHEMA_ID} ({len(doc.get('cases', []))} cases)")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
