"""Projections reading the same input -> one MatMulNBits over their stacked rows + Split.

    x ─ MatMulNBits(Wq) ─ q          x ─ MatMulNBits([Wq; Wk; Wv]) ─ Split ─ q
    x ─ MatMulNBits(Wk) ─ k    ->                                        ├─ k
    x ─ MatMulNBits(Wv) ─ v                                              └─ v

MatMulNBits quantizes its input (accuracy_level 4) and dispatches threads once per call,
and for a 640-wide model that per-call work is much of the cost of a small projection.
q/k/v share the attention norm's output and gate/up share the MLP norm's, so a layer
makes 3 calls instead of 6. Blocks run along K and belong to one output row each, so
stacking the rows (codes, scales, zero points) is exact: the same numbers, in one call.
Only nodes with identical K, bits, block size, accuracy level and zero-point presence
are stacked; the tied LM head reads its own input and is never touched.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gemma_export.exporter import lazy_weights
from gemma_export.exporter.rewrites import MS_DOMAIN, Graph, Rule, add_initializer, drop_unread_initializers


# Which rows of a packed MatMulNBits are whose: [(member's qweight initializer, rows), ...]
# in row order. It is stored in the node's doc_string as PACKED_DOC + JSON, the encoding the
# artifacts already carry (moving it would change model.onnx's bytes); `packed_rows` is the
# one reader (quantize.dequantized_weights uses it) and `_set_packed_rows` the one writer.
PACKED_DOC = "packed rows: "


def packed_rows(node: onnx.NodeProto) -> list[tuple[str, int]] | None:
    """The row map of a packed projection; None for any other node."""
    if not node.doc_string.startswith(PACKED_DOC):
        return None
    return [(qweight, int(rows)) for qweight, rows in json.loads(node.doc_string[len(PACKED_DOC):])]


def _set_packed_rows(node: onnx.NodeProto, members: list[tuple[str, int]]) -> None:
    node.doc_string = PACKED_DOC + json.dumps([[qweight, rows] for qweight, rows in members])


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: a.i for a in n.attribute}


def _signature(g: Graph, n: onnx.NodeProto):
    if n.op_type != "MatMulNBits" or n.domain != MS_DOMAIN or len(n.output) != 1:
        return None
    if not all(g.is_weight(x) for x in n.input[1:]) or len(n.input) > 4:
        return None
    a = _attrs(n)
    return (n.input[0], a.get("K"), a.get("bits"), a.get("block_size"), a.get("accuracy_level", 0), len(n.input))


class PackProjectionsRule(Rule):
    def __init__(self):
        super().__init__("pack_projections")

    def match(self, g: Graph, node):
        sig = _signature(g, node)
        if sig is None:
            return "not a MatMulNBits with weights in initializers"
        group = [n for n in g.consumers.get(node.input[0], []) if _signature(g, n) == sig]
        if len(group) < 2:
            return "no sibling projection of the same shape and kind on this input"
        if group[0] is not node:
            return "not the first of its group"
        return {"nodes": group}

    def rewrite(self, g: Graph, m) -> None:
        nodes = m["nodes"]
        ns = [_attrs(n)["N"] for n in nodes]
        base = _common_prefix([n.input[1] for n in nodes]).rstrip("._") or "packed"
        names = [f"{base}.packed.{k}" for k in ("qweight", "scales", "zero_points")]
        for slot in range(1, len(nodes[0].input)):
            parts = [lazy_weights.array(g.inits[n.input[slot]]) for n in nodes]
            rows = [p.reshape(n_rows, -1) for p, n_rows in zip(parts, ns)]
            stacked = np.concatenate(rows, axis=0)
            if slot == 1:
                stacked = stacked.reshape(sum(ns), *parts[0].shape[1:])
            elif slot == 2:
                stacked = stacked.reshape(sum(ns), *parts[0].shape[1:]) if parts[0].ndim == 2 else stacked.reshape(-1)
            else:
                stacked = stacked.reshape(-1)
            add_initializer(g, numpy_helper.from_array(stacked, names[slot - 1]))
        a = _attrs(nodes[0])
        a["N"] = sum(ns)
        scope = nodes[0].name.rsplit("/", 2)[0]
        packed = f"{scope}/packed_projection"
        mm = helper.make_node("MatMulNBits", [nodes[0].input[0], *names[: len(nodes[0].input) - 1]], [packed],
                              name=f"{scope}/PackedMatMulNBits", domain=MS_DOMAIN, **a)
        _set_packed_rows(mm, [(n.input[1], k) for n, k in zip(nodes, ns)])
        new = [
            mm,
            helper.make_node("Split", [packed, f"{packed}/split"], [n.output[0] for n in nodes],
                             name=f"{scope}/PackedSplit", axis=-1),
        ]
        add_initializer(g, numpy_helper.from_array(np.array(ns, np.int64), f"{packed}/split"))
        old_inits = {x for n in nodes for x in n.input[1:]}
        g.replace(nodes, new, at=nodes[0])
        drop_unread_initializers(g, old_inits)


def _common_prefix(names: list[str]) -> str:
    p = names[0]
    for s in names[1:]:
        while not s.startswith(p):
            p = p[:-1]
    return p
