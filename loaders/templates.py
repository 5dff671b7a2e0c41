"""Torch-free graph templates for known architectures, built from ``config.json`` plus weights.

* **Hugging Face BERT-family encoders** (``model_type`` "bert"; ``BertModel`` keys, optionally
  prefixed ``bert.``): inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64
  ``[batch, seq]``); outputs ``last_hidden_state`` ``[batch, seq, hidden]`` and, when the pooler
  weights are present, ``pooler_output`` ``[batch, hidden]`` (tanh(dense(h[:, 0]))).
  **Sentence-embedding layout** (a sentence-transformers folder: ``modules.json`` listing a
  ``Pooling`` module with mean pooling, optionally ``Normalize``): outputs ``last_hidden_state``
  and ``sentence_embedding`` (masked mean over tokens, L2-normalised when ``Normalize`` is listed).
  The math follows transformers' eager ``BertModel``: post-LN layers, additive mask
  ``(1 - mask) * float32.min``, scores divided by sqrt(head_dim), ``hidden_act`` gelu (erf),
  gelu_new/gelu_pytorch_tanh (tanh), relu, silu.
* **Plain MLP** (``model_type`` "mlp"): ``config.json``::

      {"model_type": "mlp",
       "layers": ["fc1", "fc2", "fc3"],   # optional: Linear layer names in order
                                          # (default: every 2-D "*.weight" in checkpoint order)
       "activation": "relu",              # between layers: relu|gelu|gelu_tanh|silu|tanh|sigmoid|none
       "final_activation": "none",        # after the last layer: none|softmax|sigmoid
       "input_name": "x"}                 # default "x"; input float32 [batch, in_features]

  output ``output`` ``[batch, out_features]``.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..errors import ConversionError
from ..formats.graph import Graph, ValueInfo
from .aten_map import Builder, arange_sym, eliminate_dead, fuse_activations

_ACTS = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
         "gelu_fast": ("gelu", "tanh"), "relu": ("relu", None), "silu": ("silu", None), "swish": ("silu", None),
         "tanh": ("tanh", None), "sigmoid": ("sigmoid", None), "gelu_tanh": ("gelu", "tanh")}


def read_config(folder) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, "rb") as f:
            cfg = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise ConversionError(f"cannot read config.json: {e.strerror}", file=path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"invalid JSON: {e}", file=path) from None
    if not isinstance(cfg, dict):
        raise ConversionError("config.json must be an object", file=path)
    return cfg


def template_kind(cfg: dict) -> str:
    mt = str(cfg.get("model_type", "")).lower()
    archs = [str(a) for a in cfg.get("architectures", []) or []]
    if mt in ("bert", "roberta-bert") or any(a.startswith("Bert") for a in archs):
        return "bert"
    if mt in ("mlp", "sparsedge-mlp"):
        return "mlp"
    raise ConversionError(f"no template for model_type {cfg.get('model_type')!r} (supported: bert, mlp); "
                          "use --arch module:factory with torch installed", field="model_type")


def build(folder, state_dict: dict, cfg: dict | None = None):
    """(Graph, tensors, info) for the model in ``folder`` with weights ``state_dict``."""
    cfg = cfg if cfg is not None else read_config(folder)
    kind = template_kind(cfg)
    if kind == "bert":
        return bert(cfg, state_dict, sentence=sentence_layout(folder))
    return mlp(cfg, state_dict)


def sentence_layout(folder) -> dict | None:
    """``{"pooling": "mean"|"cls", "normalize": bool}`` for a sentence-transformers folder, else None."""
    if folder is None:
        return None
    mpath = os.path.join(folder, "modules.json")
    if not os.path.isfile(mpath):
        return None
    try:
        with open(mpath, "rb") as f:
            mods = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"invalid modules.json: {e}", file=mpath) from None
    if not isinstance(mods, list):
        raise ConversionError("modules.json must be a list", file=mpath)
    types = [str(m.get("type", "")) for m in mods if isinstance(m, dict)]
    pool = next((m for m in mods if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")), None)
    if pool is None:
        return None
    pooling = "mean"
    pcfg_path = os.path.join(folder, str(pool.get("path", "1_Pooling")), "config.json")
    if os.path.isfile(pcfg_path):
        try:
            with open(pcfg_path, "rb") as f:
                pcfg = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"invalid pooling config: {e}", file=pcfg_path) from None
        if pcfg.get("pooling_mode_mean_tokens"):
            pooling = "mean"
        elif pcfg.get("pooling_mode_cls_token"):
            pooling = "cls"
        else:
            raise ConversionError("only mean or CLS pooling is supported", file=pcfg_path)
    return {"pooling": pooling, "normalize": any(t.endswith("Normalize") for t in types)}


def _strip_prefix(sd: dict) -> dict:
    keys = list(sd)
    for pre in ("bert.", "model.", "0.auto_model.", "auto_model."):
        if any(k.startswith(pre + "embeddings.") for k in keys):
            return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return dict(sd)


def _need(sd, key):
    if key not in sd:
        raise ConversionError("missing from the checkpoint (not a BertModel layout?)", tensor=key)
    return np.ascontiguousarray(sd[key], dtype=np.float32)


def bert(cfg: dict, state_dict: dict, sentence: dict | None = None):
    """The HF BertModel graph (see the module docstring)."""
    sd = _strip_prefix(state_dict)
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        nlayers = int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"config.json lacks a valid {e}", field=str(e).strip("'")) from None
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    act = _ACTS.get(str(cfg.get("hidden_act", "gelu")))
    if act is None:
        raise ConversionError(f"hidden_act {cfg.get('hidden_act')!r} is not supported", field="hidden_act")
    if hidden % heads:
        raise ConversionError("hidden_size is not a multiple of num_attention_heads", field="hidden_size")
    pet = str(cfg.get("position_embedding_type", "absolute"))
    if pet != "absolute":
        raise ConversionError(f"position_embedding_type {pet!r} is not supported", field="position_embedding_type")
    dh = hidden // heads
    b = Builder()
    B, S = "batch", "seq"
    inputs = [ValueInfo("input_ids", "int64", [B, S]), ValueInfo("attention_mask", "int64", [B, S]),
              ValueInfo("token_type_ids", "int64", [B, S])]
    for v in inputs:
        b.taken.add(v.name)
    T = {}

    def t(key, hint=None):
        if key not in T:
            name = b.fresh(key)
            b.tensors[name] = _need(sd, key)
            T[key] = name
        return T[key]

    def linear(x, prefix, act=None):
        attrs = {}
        out = b.add("linear", [x, t(prefix + ".weight"), t(prefix + ".bias")] if prefix + ".bias" in sd
                    else [x, t(prefix + ".weight")], attrs, name=prefix)
        if act is not None:
            op, approx = act
            out = b.add(op, [out], {"approximate": approx} if op == "gelu" else {}, name=prefix + "_act")
        return out

    def layernorm(x, prefix):
        return b.add("layernorm", [x, t(prefix + ".weight"), t(prefix + ".bias")], {"eps": eps, "axis": -1},
                     name=prefix)

    e = "embeddings."
    we = b.add("embedding", ["input_ids", t(e + "word_embeddings.weight")], name=e + "word")
    ptab = t(e + "position_embeddings.weight")
    pids = arange_sym(b, "input_ids", 1, S, int(b.tensors[ptab].shape[0]), name="position_ids")
    pos = b.add("embedding", [pids, ptab], name=e + "position")
    x = b.add("add", [we, pos], name=e + "add_pos")
    if e + "token_type_embeddings.weight" in sd:
        te = b.add("embedding", ["token_type_ids", t(e + "token_type_embeddings.weight")], name=e + "token_type")
        x = b.add("add", [x, te], name=e + "add_type")
    x = layernorm(x, e + "LayerNorm")
    m = b.add("cast", ["attention_mask"], {"dtype": "float32"}, name="mask_float")
    m4 = b.add("unsqueeze", [m], {"axes": [1, 2]}, name="mask_4d")
    one = b.const(np.array(1.0, np.float32), "one")
    inv = b.add("sub", [one, m4], name="mask_inv")
    neg = b.const(np.array(np.finfo(np.float32).min, np.float32), "mask_min")
    addmask = b.add("mul", [inv, neg], name="mask_add")
    scale = b.const(np.array(math.sqrt(dh), np.float32), "sqrt_head_dim")
    for i in range(nlayers):
        p = f"encoder.layer.{i}."
        q = b.add("reshape", [linear(x, p + "attention.self.query")], {"shape": [B, S, heads, dh]}, name=p + "q_heads")
        q = b.add("transpose", [q], {"perm": [0, 2, 1, 3]}, name=p + "q_t")
        k = b.add("reshape", [linear(x, p + "attention.self.key")], {"shape": [B, S, heads, dh]}, name=p + "k_heads")
        k = b.add("transpose", [k], {"perm": [0, 2, 3, 1]}, name=p + "k_t")
        v = b.add("reshape", [linear(x, p + "attention.self.value")], {"shape": [B, S, heads, dh]}, name=p + "v_heads")
        v = b.add("transpose", [v], {"perm": [0, 2, 1, 3]}, name=p + "v_t")
        sc = b.add("matmul", [q, k], name=p + "scores")
        sc = b.add("div", [sc, scale], name=p + "scores_scaled")
        pr = b.add("softmax", [sc, addmask], {"axis": -1}, name=p + "probs")
        ctx = b.add("matmul", [pr, v], name=p + "context")
        ctx = b.add("transpose", [ctx], {"perm": [0, 2, 1, 3]}, name=p + "context_t")
        ctx = b.add("reshape", [ctx], {"shape": [B, S, hidden]}, name=p + "context_merged")
        ao = linear(ctx, p + "attention.output.dense")
        x = layernorm(b.add("add", [ao, x], name=p + "attention_residual"), p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense", act)
        o = linear(h, p + "output.dense")
        x = layernorm(b.add("add", [o, x], name=p + "output_residual"), p + "output.LayerNorm")
    outputs = []
    _rename(b, x, "last_hidden_state")
    outputs.append(ValueInfo("last_hidden_state", "float32", [B, S, hidden]))
    if sentence is not None:
        if sentence["pooling"] == "mean":
            pooled = b.add("masked_mean", ["last_hidden_state", m], {"axis": 1}, name="mean_pooling")
        else:
            s0 = b.add("slice", ["last_hidden_state"], {"axis": 1, "start": 0, "end": 1}, name="cls_slice")
            pooled = b.add("squeeze", [s0], {"axes": [1]}, name="cls_pooling")
        if sentence["normalize"]:
            pooled = b.add("l2norm", [pooled], {"axis": -1, "eps": 1e-12}, name="normalize")
        _rename(b, pooled, "sentence_embedding")
        outputs.append(ValueInfo("sentence_embedding", "float32", [B, hidden]))
    elif "pooler.dense.weight" in sd:
        s0 = b.add("slice", ["last_hidden_state"], {"axis": 1, "start": 0, "end": 1}, name="pooler_slice")
        s0 = b.add("squeeze", [s0], {"axes": [1]}, name="pooler_first")
        po = linear(s0, "pooler.dense", ("tanh", None))
        _rename(b, po, "pooler_output")
        outputs.append(ValueInfo("pooler_output", "float32", [B, hidden]))
    g = Graph(inputs, outputs, b.nodes)
    stats = {"activations_fused": fuse_activations(g), "dead_nodes_removed": eliminate_dead(g, b.tensors)}
    used = {k for k in sd if k in T}
    unused = [k for k in sd if k not in used and not k.endswith("position_ids") and not k.startswith("pooler.")]
    info = {"template": "bert" if sentence is None else "bert-sentence", **stats}
    if unused:
        info["unused_tensors"] = unused[:20]
    return g, b.tensors, info


def _rename(b: Builder, old: str, new: str):
    for nd in b.nodes:
        nd.inputs = [new if x == old else x for x in nd.inputs]
        nd.outputs = [new if x == old else x for x in nd.outputs]
    b.taken.add(new)


def mlp(cfg: dict, state_dict: dict):
    """The plain MLP graph (see the module docstring)."""
    names = cfg.get("layers")
    if names is None:
        names = [k[: -len(".weight")] for k, v in state_dict.items()
                 if k.endswith(".weight") and np.ndim(v) == 2]
    if not names or not isinstance(names, list):
        raise ConversionError("no Linear layers found (config 'layers' or 2-D '*.weight' tensors)", field="layers")
    act_name = str(cfg.get("activation", "relu"))
    act = None if act_name == "none" else _ACTS.get(act_name)
    if act_name != "none" and act is None:
        raise ConversionError(f"activation {act_name!r} is not supported", field="activation")
    final = str(cfg.get("final_activation", "none"))
    if final not in ("none", "softmax", "sigmoid"):
        raise ConversionError(f"final_activation {final!r} is not supported", field="final_activation")
    xname = str(cfg.get("input_name", "x"))
    b = Builder(reserved=[xname])
    x = xname
    prev_out = None
    first_in = None
    for i, n in enumerate(names):
        wk, bk = f"{n}.weight", f"{n}.bias"
        if wk not in state_dict:
            raise ConversionError("missing from the checkpoint", tensor=wk)
        w = np.ascontiguousarray(state_dict[wk], dtype=np.float32)
        if w.ndim != 2:
            raise ConversionError(f"expected a 2-D Linear weight, got shape {w.shape}", tensor=wk)
        if prev_out is not None and w.shape[1] != prev_out:
            raise ConversionError(f"takes {w.shape[1]} inputs but the previous layer gives {prev_out}", tensor=wk)
        first_in = first_in or w.shape[1]
        prev_out = w.shape[0]
        b.tensors[wk] = w
        b.taken.add(wk)
        ins = [x, wk]
        if bk in state_dict:
            b.tensors[bk] = np.ascontiguousarray(state_dict[bk], dtype=np.float32)
            b.taken.add(bk)
            ins.append(bk)
        x = b.add("linear", ins, name=n)
        if i < len(names) - 1 and act is not None:
            op, approx = act
            x = b.add(op, [x], {"approximate": approx} if op == "gelu" else {}, name=f"{n}_act")
    if final == "softmax":
        x = b.add("softmax", [x], {"axis": -1}, name="softmax")
    elif final == "sigmoid":
        x = b.add("sigmoid", [x], name="sigmoid")
    _rename(b, x, "output")
    g = Graph([ValueInfo(xname, "float32", ["batch", first_in])], [ValueInfo("output", "float32", ["batch", prev_out])],
              b.nodes)
    stats = {"activations_fused": fuse_activations(g)}
    return g, b.tensors, {"template": "mlp", **stats}
