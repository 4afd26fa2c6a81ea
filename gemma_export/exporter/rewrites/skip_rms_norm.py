"""Residual add + RMSNorm -> SkipSimplifiedLayerNormalization (com.microsoft).

    a ─┐
       Add ─ SimplifiedLayerNormalization ─ y        (runs after rms_norm)
    b ─┘  └─ sum, still used by the next residual add

One kernel adds, writes the sum for the residual stream, and normalises it.
"""

from __future__ import annotations

from onnx import helper

from gemma_export.exporter.rewrites import MS_DOMAIN, Graph, Rule


class SkipRMSNormRule(Rule):
    def __init__(self):
        super().__init__("skip_rms_norm")

    def match(self, g: Graph, norm):
        if norm.op_type != "SimplifiedLayerNormalization":
            return "not a SimplifiedLayerNormalization"
        add = g.prod(norm.input[0], "Add")
        if add is None:
            return "norm input is not an Add"
        if any(g.is_weight(i) or g.const(i) is not None for i in add.input):
            return "the Add has a constant operand (a bias, not a residual)"
        if add.output[0] in g.outputs:
            return "the sum is a graph output"
        attrs = {a.name: a for a in norm.attribute}
        return {"add": add, "norm": norm, "eps": attrs["epsilon"].f, "scale": norm.input[1]}

    def rewrite(self, g: Graph, m) -> None:
        add, norm = m["add"], m["norm"]
        node = helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], m["scale"]],
            [norm.output[0], "", "", add.output[0]],
            name=norm.name.replace("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
            domain=MS_DOMAIN, epsilon=m["eps"],
        )
        # At the Add: its inputs exist there, and every user of the sum comes after it.
        g.replace([add, norm], [node], at=add)
