"""Graph rewrite rules for ONNX Runtime, one rule per file (onnxscript rewriter style),
and the graph helpers they share.

Each rule is a `Rule` with
    match(g, node)  -> a dict of what it found, or a string saying why it did not match
    rewrite(g, m)   -> replaces the matched nodes
and optimize.py applies the rules in a fixed order, counting how many times each fired.
`Graph` gives the rules what they need: producers, consumers, constant values, and node
replacement that keeps the node list topologically ordered; the functions below add nodes
after a producer, add or drop initializers, and drop dead nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"


class Graph:
    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.g = proto.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.outputs = {o.name for o in self.g.output}
        self.refresh()

    def refresh(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def prod(self, name: str, op_type: str) -> onnx.NodeProto | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op_type else None

    def only_use(self, name: str) -> bool:
        """`name` feeds exactly one node and is not a graph output (safe to fuse away)."""
        return len(self.consumers.get(name, [])) == 1 and name not in self.outputs

    def const(self, name: str) -> np.ndarray | None:
        """The value of a small constant (initializer stored inline or Constant node)."""
        t = self.inits.get(name)
        if t is not None:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                return None
            return numpy_helper.to_array(t)
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def is_weight(self, name: str) -> bool:
        return name in self.inits

    def replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto], at: onnx.NodeProto) -> None:
        """Remove `old`, put `new` where `at` was (callers pick an `at` after every input of
        `new` is produced and before every consumer of its outputs)."""
        drop = {id(n) for n in old}
        nodes = []
        for n in self.g.node:
            if n is at:
                nodes.extend(new)
            if id(n) not in drop:
                nodes.append(n)
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.refresh()


def insert_after(g: Graph, new: list[onnx.NodeProto], after: str | None) -> None:
    """Put `new` right after the node that produces `after` (None: at the top of the graph).
    The node list is copied back, so node objects held from before are stale."""
    nodes = list(g.g.node)
    at = nodes.index(g.producer[after]) + 1 if after is not None else 0
    nodes[at:at] = new
    del g.g.node[:]
    g.g.node.extend(nodes)
    g.refresh()


def add_initializer(g: Graph, t: onnx.TensorProto) -> str:
    """Append `t` to the graph's initializers; returns its name."""
    g.g.initializer.append(t)
    g.inits[t.name] = g.g.initializer[-1]
    return t.name


def int64_initializer(g: Graph, name: str, values: list[int], shape: list[int]) -> str:
    """An int64 initializer `name` (added the first time it is asked for); returns `name`."""
    if name not in g.inits:
        add_initializer(g, onnx.helper.make_tensor(name, onnx.TensorProto.INT64, shape, values))
    return name


def drop_unread_initializers(g: Graph, names: set[str] | None = None) -> None:
    """Delete the initializers (among `names`, or all) that no node and no graph input reads.
    In place: rebuilding the list would copy every initializer (the 84 MB embedding codes
    of the real 270M included) once per call."""
    used = {x for n in g.g.node for x in n.input} | {i.name for i in g.g.input}
    for idx in reversed(range(len(g.g.initializer))):
        name = g.g.initializer[idx].name
        if (names is None or name in names) and name not in used:
            del g.g.initializer[idx]
    g.inits = {t.name: t for t in g.g.initializer}


def dead_code_elimination(g: Graph) -> int:
    """Drop nodes whose outputs nobody reads (and initializers no node reads); returns how
    many nodes went."""
    removed = 0
    while True:
        used = {x for n in g.g.node for x in n.input} | g.outputs
        keep = [n for n in g.g.node if any(o in used for o in n.output if o)]
        if len(keep) == len(g.g.node):
            break
        removed += len(g.g.node) - len(keep)
        del g.g.node[:]
        g.g.node.extend(keep)
    drop_unread_initializers(g)
    g.refresh()
    return removed


def ensure_ms_opset(proto: onnx.ModelProto) -> None:
    """Declare the com.microsoft domain once, for graphs that now use its contrib ops."""
    ensure_opset(proto, MS_DOMAIN, 1)


def ensure_opset(proto: onnx.ModelProto, domain: str, version: int) -> None:
    """Import `domain` at `version` or later (for an op that first appears there)."""
    for o in proto.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    proto.opset_import.append(onnx.helper.make_opsetid(domain, version))


def other_input(node: onnx.NodeProto, name: str) -> str:
    """The input of a binary node that is not `name`."""
    a, b = node.input
    return b if a == name else a


def scalar(g: Graph, name: str) -> float | None:
    v = g.const(name)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


@dataclass
class Rule:
    name: str

    def match(self, g: Graph, node: onnx.NodeProto) -> dict[str, Any] | str:
        raise NotImplementedError

    def rewrite(self, g: Graph, m: dict[str, Any]) -> None:
        raise NotImplementedError
