"""Tanh-approximated GELU -> FastGelu (com.microsoft).

    x ─ Pow(3) ─ Mul(0.044715) ─ Add(x) ─ Mul(sqrt(2/pi)) ─ Tanh ─ Add(1) ─ Mul(0.5) ─ Mul(x) ─ y

FastGelu computes exactly 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the
`approximate="tanh"` GELU of Gemma's GeGLU. Eight nodes become one.
"""

from __future__ import annotations

import math

from onnx import helper

from gemma_export.exporter.rewrites import MS_DOMAIN, Graph, Rule, other_input, scalar


def _near(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


class GeluRule(Rule):
    def __init__(self):
        super().__init__("gelu_tanh")

    def match(self, g: Graph, tanh):
        if tanh.op_type != "Tanh":
            return "not a Tanh"
        m_in = g.prod(tanh.input[0], "Mul")
        if m_in is None:
            return "Tanh input is not a Mul"
        inner = [i for i in m_in.input if g.prod(i, "Add")]
        if len(inner) != 1 or not _near(scalar(g, other_input(m_in, inner[0])), math.sqrt(2 / math.pi)):
            return "Tanh input is not sqrt(2/pi) * (...)"
        add_in = g.producer[inner[0]]
        cube_mul = next((g.producer[i] for i in add_in.input if g.prod(i, "Mul")), None)
        if cube_mul is None:
            return "no 0.044715 * x^3 term"
        x = other_input(add_in, cube_mul.output[0])
        pow_ = next((g.producer[i] for i in cube_mul.input if g.prod(i, "Pow")), None)
        if pow_ is None or pow_.input[0] != x or scalar(g, pow_.input[1]) != 3.0:
            return "cubic term is not Pow(x, 3)"
        if not _near(scalar(g, other_input(cube_mul, pow_.output[0])), 0.044715):
            return "cubic coefficient is not 0.044715"
        chain = []
        cur = tanh.output[0]
        for op, const in (("Add", 1.0), ("Mul", 0.5)):
            users = g.consumers.get(cur, [])
            if len(users) != 1 or users[0].op_type != op or scalar(g, other_input(users[0], cur)) != const:
                return f"Tanh is not followed by {op}({const})"
            chain.append(users[0])
            cur = users[0].output[0]
        users = g.consumers.get(cur, [])
        if len(users) != 1 or users[0].op_type != "Mul" or other_input(users[0], cur) != x:
            return "result is not multiplied by x"
        last = users[0]
        inner_nodes = [pow_, cube_mul, add_in, m_in, tanh, *chain]
        if not all(g.only_use(n.output[0]) for n in inner_nodes):
            return "an intermediate has other users"
        return {"nodes": [*inner_nodes, last], "x": x, "out": last.output[0],
                "name": last.name.rsplit("/", 1)[0] + "/FastGelu"}

    def rewrite(self, g: Graph, m) -> None:
        node = helper.make_node("FastGelu", [m["x"]], [m["out"]], name=m["name"], domain=MS_DOMAIN)
        g.replace(m["nodes"], [node], at=m["nodes"][-1])
