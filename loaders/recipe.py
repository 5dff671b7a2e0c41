"""Compression recipes: defaults, per-layer overrides by name pattern, and layers to skip.

A recipe is a TOML or JSON file (by extension; ``.toml`` needs Python 3.11+ or ``tomli``)::

    # defaults for every layer (top level, or under [defaults])
    prune = "0.9"            # same grammar as --prune
    quant = "int8"           # same grammar as --quant
    lowrank = "none"         # same grammar as --lowrank
    format = "auto"          # same grammar as --format
    skip = ["embeddings.*", "classifier"]     # layer-name globs left untouched (dense float32)

    [[layers]]               # overrides, applied in order: a later match wins
    match = "encoder.layer.*.intermediate.dense"   # a glob or a list of globs (fnmatch)
    prune = "block:4x1:0.8"
    format = "bsr:4x1"

    [[layers]]
    match = ["pooler.*"]
    skip = true

Layer names are the weight names without ``.weight`` (``layers.0.conv1``, ``encoder.layer.0.
attention.self.query``). Precedence: recipe defaults < command-line flags < matching ``[[layers]]``
entries (in file order). A pattern that matches no layer is reported (a likely typo).
"""
from __future__ import annotations

import fnmatch
import json
import os

from ..errors import ConversionError
from .compress import LayerPlan, parse_format, parse_lowrank, parse_prune, parse_quant

_SETTINGS = ("prune", "quant", "lowrank", "format")
_TOP = set(_SETTINGS) | {"skip", "layers", "defaults", "description"}
_LAYER = set(_SETTINGS) | {"match", "skip"}


def load_recipe(path) -> dict:
    """Read and check a recipe file; returns ``{"defaults": {...}, "skip": [...], "layers": [...]}``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConversionError(f"cannot read recipe: {e.strerror}", file=path) from None
    if path.endswith(".toml"):
        try:
            import tomllib  # type: ignore[import-not-found]
        except ImportError:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ConversionError("TOML recipes need Python 3.11+ (or tomli); use JSON", file=path) from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConversionError(f"invalid TOML: {e}", file=path) from None
    else:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"invalid JSON: {e}", file=path) from None
    return check_recipe(data, path)


def check_recipe(data, path="<recipe>") -> dict:
    """Validate a recipe dict (from a file or the Python API) and normalise it."""
    if not isinstance(data, dict):
        raise ConversionError("a recipe must be a table/object", file=path)
    bad = sorted(set(data) - _TOP)
    if bad:
        raise ConversionError(f"unknown key(s) {bad}; allowed: {sorted(_TOP)}", file=path, field=bad[0])
    defaults = {k: data[k] for k in _SETTINGS if k in data}
    if "defaults" in data:
        d = data["defaults"]
        if not isinstance(d, dict) or set(d) - (set(_SETTINGS) | {"skip"}):
            raise ConversionError(f"[defaults] takes only {list(_SETTINGS) + ['skip']}", file=path,
                                  field="defaults")
        defaults.update({k: v for k, v in d.items() if k != "skip"})
        if "skip" in d:
            data = dict(data, skip=list(data.get("skip", [])) + list(_globs(d["skip"], path, "defaults.skip")))
    for k, v in defaults.items():
        _parse_setting(k, v, path, k)
    skip = _globs(data.get("skip", []), path, "skip")
    layers = []
    entries = data.get("layers", [])
    if not isinstance(entries, list):
        raise ConversionError("layers must be a list of tables", file=path, field="layers")
    for i, e in enumerate(entries):
        where = f"layers[{i}]"
        if not isinstance(e, dict):
            raise ConversionError("must be a table", file=path, field=where)
        bad = sorted(set(e) - _LAYER)
        if bad:
            raise ConversionError(f"unknown key(s) {bad}; allowed: {sorted(_LAYER)}", file=path, field=where)
        if "match" not in e:
            raise ConversionError("needs a 'match' pattern", file=path, field=where)
        ent = {"match": _globs(e["match"], path, where + ".match")}
        for k in _SETTINGS:
            if k in e:
                _parse_setting(k, e[k], path, f"{where}.{k}")
                ent[k] = e[k]
        if "skip" in e:
            if not isinstance(e["skip"], bool):
                raise ConversionError("skip must be true or false", file=path, field=where + ".skip")
            ent["skip"] = e["skip"]
        layers.append(ent)
    return {"defaults": defaults, "skip": skip, "layers": layers, "path": path}


def _globs(v, path, field) -> list:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise ConversionError("must be a glob string or a list of them", file=path, field=field)


def _parse_setting(key, value, path, field):
    if value is not None and not isinstance(value, (str, int, float)):
        raise ConversionError(f"{key} must be a string", file=path, field=field)
    try:
        return {"prune": parse_prune, "quant": parse_quant, "lowrank": parse_lowrank,
                "format": parse_format}[key](value)
    except ConversionError:
        raise
    except Exception as e:  # InputError from the parsers: re-raise naming the recipe field
        raise ConversionError(getattr(e, "detail", str(e)), file=path, field=field) from None


def resolve_plans(layer_names: list, flags: dict, recipe: dict | None) -> tuple[dict, list]:
    """Per-layer plans. ``flags``: {"prune", "quant", "lowrank", "format"} from the command line /
    API (None = not given). Returns ``({layer: LayerPlan}, notes)``."""
    recipe = recipe or {"defaults": {}, "skip": [], "layers": []}
    base = dict(recipe["defaults"])
    for k in _SETTINGS:
        if flags.get(k) is not None:
            base[k] = flags[k]
    notes = []
    plans = {}
    used_skip, used_layers = set(), set()
    for name in layer_names:
        s = dict(base)
        skip = False
        for pat in recipe["skip"]:
            if fnmatch.fnmatchcase(name, pat):
                skip = True
                used_skip.add(pat)
        for i, e in enumerate(recipe["layers"]):
            if any(fnmatch.fnmatchcase(name, p) for p in e["match"]):
                used_layers.add(i)
                for k in _SETTINGS:
                    if k in e:
                        s[k] = e[k]
                if "skip" in e:
                    skip = e["skip"]
        plans[name] = LayerPlan(prune=parse_prune(s.get("prune")), quant=parse_quant(s.get("quant")),
                                lowrank=parse_lowrank(s.get("lowrank")), fmt=parse_format(s.get("format", "auto")),
                                skip=skip)
    for pat in recipe["skip"]:
        if pat not in used_skip:
            notes.append(f"recipe skip pattern {pat!r} matches no layer")
    for i, e in enumerate(recipe["layers"]):
        if i not in used_layers:
            notes.append(f"recipe layers[{i}] match {e['match']} matches no layer")
    return plans, notes


def describe(flags: dict, recipe: dict | None) -> dict:
    """The effective recipe, JSON-able (stored in the model file's metadata)."""
    out = {k: (str(v) if v is not None else None) for k, v in flags.items()}
    if recipe:
        out["recipe"] = {"defaults": recipe["defaults"], "skip": recipe["skip"], "layers": recipe["layers"],
                         "file": os.path.basename(str(recipe.get("path", "")))}
    return out
