"""RMSNorm -> SimplifiedLayerNormalization (ONNX Runtime, default domain).

    x ─ Pow(2) ─ ReduceMean(-1) ─ Add(eps) ─ Sqrt ─ Reciprocal ─┐
    └──────────────────────────────────────────────────────── Mul ─ Mul(scale) ─ y

What torch.onnx emits for models/gemma.py's RMSNorm (rsqrt decomposed into Sqrt +
Reciprocal; `1 + w` already folded into the `scale` initializer, computed in fp32).
Seven nodes become one kernel that reads x once.
"""

from __future__ import annotations

from onnx import helper

from gemma_export.exporter.rewrites import Graph, Rule, other_input, scalar


class RMSNormRule(Rule):
    def __init__(self):
        super().__init__("rms_norm")

    def match(self, g: Graph, recip):
        if recip.op_type != "Reciprocal":
            return "not a Reciprocal"
        sqrt = g.prod(recip.input[0], "Sqrt")
        add = sqrt and g.prod(sqrt.input[0], "Add")
        if add is None:
            return "Reciprocal is not of Sqrt(Add(...))"
        mean = g.prod(add.input[0], "ReduceMean") or g.prod(add.input[1], "ReduceMean")
        if mean is None:
            return "no ReduceMean under the Add"
        eps = scalar(g, other_input(add, mean.output[0]))
        if eps is None:
            return "epsilon is not a constant scalar"
        axes = g.const(mean.input[1]) if len(mean.input) > 1 else None
        keep = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
        if axes is None or axes.reshape(-1).tolist() != [-1] or keep != 1:
            return "ReduceMean is not over the last axis with keepdims"
        pow_ = g.prod(mean.input[0], "Pow")
        if pow_ is None or scalar(g, pow_.input[1]) != 2.0:
            return "ReduceMean input is not Pow(x, 2)"
        x = pow_.input[0]
        users = g.consumers.get(recip.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul" or other_input(users[0], recip.output[0]) != x:
            return "1/rms does not multiply the same x"
        mul1 = users[0]
        users = g.consumers.get(mul1.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul":
            return "normalised x is not scaled by one Mul"
        mul2 = users[0]
        scale = other_input(mul2, mul1.output[0])
        if not g.is_weight(scale):
            return "scale is not a weight"
        for v in (pow_.output[0], mean.output[0], add.output[0], sqrt.output[0], recip.output[0], mul1.output[0]):
            if not g.only_use(v):
                return f"intermediate {v} has other users"
        return {"nodes": [pow_, mean, add, sqrt, recip, mul1, mul2], "x": x, "scale": scale, "eps": eps,
                "out": mul2.output[0], "name": mul2.name.rsplit("/", 1)[0] + "/SimplifiedLayerNormalization"}

    def rewrite(self, g: Graph, m) -> None:
        node = helper.make_node(
            "SimplifiedLayerNormalization", [m["x"], m["scale"]], [m["out"]], name=m["name"],
            axis=-1, epsilon=m["eps"], stash_type=1,
        )
        g.replace(m["nodes"], [node], at=m["nodes"][-1])
