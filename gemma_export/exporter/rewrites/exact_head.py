"""The LM head's top candidates recomputed without the int8 activation rounding.

    h ─ MatMulNBits(E) ─ logits  ->  h ─ MatMulNBits(E) ─ TopK(k) ─ ids ─ GatherBlockQuantized(E) ─ MatMul(h) ─┐
                                                    └──────────────────────────────────────── ScatterElements ─ logits

At accuracy_level 4 MatMulNBits rounds the head's input to int8, and on held-out text that
rounding, more than any other product's, is what moves the argmax (docs/design.md). The
head reads a 262144-row embedding, so running all of it in fp32 is out of the question, but
only its largest logits decide the argmax and carry the probability mass: the k largest
rounded logits are recomputed in fp32 from the very rows the head dequantizes (the
embedding gather's GatherBlockQuantized over the same codes, scales and zero points) and
written back over the rounded ones. Every other logit is as MatMulNBits computed it.

`exact_top_k(g, k)` rewrites the graph's LM head (the MatMulNBits reading the codes the
embedding's GatherBlockQuantized also reads); it returns the k it used (k is capped at the
vocabulary), or 0 when the graph has no such head.
"""

from __future__ import annotations

from onnx import helper

from gemma_export.exporter.rewrites import MS_DOMAIN, Graph, insert_after, int64_initializer

HEAD_NODE = "/lm_head/MatMulNBits"
EXACT_TOP_K = "lm_head.exact_top_k"  # the k, as an initializer (quantize.product_table reads it)


def exact_top_k(g: Graph, k: int) -> int:
    """Rewrite the LM head of `g` (see the module doc); the k used, 0 if there is no head."""
    head = next((n for n in g.g.node if n.op_type == "MatMulNBits" and n.name == HEAD_NODE), None)
    if head is None:
        return 0
    gather = next((n for n in g.g.node if n.op_type == "GatherBlockQuantized" and n.input[0] == head.input[1]), None)
    if gather is None:
        return 0
    vocab = {a.name: a.i for a in head.attribute}["N"]
    k = min(k, vocab)
    h, logits = head.input[0], head.output[0]  # the head reads h [M, H] (the Gemm it replaced was 2-D)
    rounded, top, ids, rows4, rows, col, exact3, exact = (
        f"{logits}/{t}" for t in ("rounded", "top_values", "top_ids", "rows_blocks", "rows", "h_column",
                                  "exact_column", "exact"))
    k_name = int64_initializer(g, EXACT_TOP_K, [k], [1])
    rows_shape = int64_initializer(g, "lm_head.exact_rows_shape", [0, 0, -1], [3])
    last = int64_initializer(g, "lm_head.exact_last_axis", [-1], [1])
    head.output[0] = rounded
    g.refresh()  # `rounded` now has its producer, the head
    nodes = [
        helper.make_node("TopK", [rounded, k_name], [top, ids], name="/lm_head/ExactTopK", axis=-1),
        helper.make_node("GatherBlockQuantized", [gather.input[0], ids, *gather.input[2:]], [rows4],
                         name="/lm_head/ExactRows", domain=MS_DOMAIN,
                         **{a.name: helper.get_attribute_value(a) for a in gather.attribute}),
        helper.make_node("Reshape", [rows4, rows_shape], [rows], name="/lm_head/ExactRowsReshape"),
        helper.make_node("Unsqueeze", [h, last], [col], name="/lm_head/ExactColumn"),
        helper.make_node("MatMul", [rows, col], [exact3], name="/lm_head/ExactMatMul"),
        helper.make_node("Squeeze", [exact3, last], [exact], name="/lm_head/ExactSqueeze"),
        helper.make_node("ScatterElements", [rounded, ids, exact], [logits], name="/lm_head/ExactScatter", axis=-1),
    ]
    insert_after(g, nodes, rounded)
    return k
