"""The graph stored in a model file: plain data, JSON-serialisable, validated against the op table.

Values are named. A node input names either a graph input, an earlier node's output, or a
tensor stored in the file (weights and constants). Node order is a topological order.
Shapes are lists of dims; a dim is an int or a symbol string (e.g. "batch", "seq").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

Dim = Union[int, str]

# dtypes a graph value may have (input/output declarations, cast targets)
VALUE_DTYPES = ("float32", "int64", "int32", "int8", "uint8", "bool")


@dataclass
class ValueInfo:
    name: str
    dtype: str  # one of VALUE_DTYPES
    shape: list  # list[Dim]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "ValueInfo":
        return cls(d["name"], d["dtype"], list(d["shape"]))


@dataclass
class Node:
    op: str  # a key of optable.OPS
    name: str  # unique node name (used in errors, reports, kernel overrides)
    inputs: list  # list[str]; "" marks an omitted optional input
    outputs: list  # list[str]
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"op": self.op, "name": self.name, "inputs": list(self.inputs),
                "outputs": list(self.outputs), "attrs": dict(self.attrs)}

    @classmethod
    def from_json(cls, d: dict) -> "Node":
        return cls(d["op"], d["name"], list(d["inputs"]), list(d["outputs"]), dict(d.get("attrs", {})))


@dataclass
class Graph:
    inputs: list  # list[ValueInfo]
    outputs: list  # list[ValueInfo]
    nodes: list  # list[Node], topologically ordered
    # static activation quantization: value name -> {"scale": float, "zero_point": int}
    act_quant: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"inputs": [v.to_json() for v in self.inputs],
                "outputs": [v.to_json() for v in self.outputs],
                "nodes": [n.to_json() for n in self.nodes],
                "act_quant": dict(self.act_quant)}

    @classmethod
    def from_json(cls, d: dict) -> "Graph":
        return cls([ValueInfo.from_json(v) for v in d["inputs"]],
                   [ValueInfo.from_json(v) for v in d["outputs"]],
                   [Node.from_json(n) for n in d["nodes"]],
                   dict(d.get("act_quant", {})))
