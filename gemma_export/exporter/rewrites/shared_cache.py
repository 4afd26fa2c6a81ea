"""Once every layer's attention is a GroupQueryAttention, make the KV cache one buffer per
tensor, read and written in place (the I/O contract's shared variant, `kv_cache="shared"`).

    past_key_values.{i}.*  [B, kv_heads, past_sequence_length, D]      both become
    present.{i}.*          [B, kv_heads, total_sequence_length, D]  ->  [B, kv_heads, cache_capacity, D]

The runtime binds present.* to the same memory as past_key_values.*, and GroupQueryAttention
writes the new positions [T - S, T) into it, so a step copies nothing but those. Whatever
else read the past's shape (the traced graph takes the past length and the batch from it)
reads the logical shape [B, kv_heads, T - S, D] instead, which is what it was under the
concat contract. The pipeline ships the graph from before the attention fusion beside the
result as model.portable.onnx.

Not a pattern rule: one change to the whole graph, which optimize.py runs after the
attention rule; `share_kv_cache` says whether it applied.
"""

from __future__ import annotations

import onnx
from onnx import helper

from gemma_export.contract import CAPACITY
from gemma_export.exporter.rewrites import Graph, insert_after, int64_initializer
from gemma_export.exporter.rewrites.attention import COMMON_SCOPE


def share_kv_cache(g: Graph, cfg) -> bool:
    """Make the cache shared when GroupQueryAttention reads every past_key_values.* (and
    nothing else does but Shape); returns whether it did."""

    past = [i.name for i in g.g.input if i.name.startswith("past_key_values.")]
    readers = [n for name in past for n in g.consumers.get(name, [])]
    if not any(n.op_type == "GroupQueryAttention" for n in readers):
        return False
    if not all(n.op_type in ("GroupQueryAttention", "Shape") for n in readers):
        return False  # a layer is not fused: its Concat needs the concat contract

    p = COMMON_SCOPE

    def past_readers() -> list[onnx.NodeProto]:
        return [n for name in past for n in g.consumers.get(name, []) if n.op_type != "GroupQueryAttention"]

    readers = past_readers()
    if readers and f"{p}/past_shape" not in g.producer:
        # B, T and [B, S] (position_ids' shape) come from the attention rule's common nodes
        new = [
            helper.make_node("Slice", [f"{p}/ids_shape", int64_initializer(g, f"{p}/one", [1], [1]),
                                       int64_initializer(g, f"{p}/two", [2], [1])],
                             [f"{p}/S"], name=f"{p}/Slice_S"),
            helper.make_node("Sub", [f"{p}/T", f"{p}/S"], [f"{p}/P"], name=f"{p}/Sub_P"),
            helper.make_node("Concat", [f"{p}/B", int64_initializer(g, f"{p}/kv_heads", [cfg.num_key_value_heads], [1]),
                                        f"{p}/P", int64_initializer(g, f"{p}/head_dim", [cfg.head_dim], [1])],
                             [f"{p}/past_shape"], name=f"{p}/Concat_past_shape", axis=0),
        ]
        # after the common block (which feeds them), before every reader (which follow it)
        insert_after(g, new, after=f"{p}/B")
        readers = past_readers()  # insert_after made the node objects held above stale
    present = [o.name for o in g.g.output if o.name.startswith("present.")]
    if any(g.consumers.get(name) for name in present):
        raise ValueError("a node reads present.*: it would see the whole buffer; cannot share the cache")
    for n in readers:
        if n.op_type != "Shape":
            raise ValueError(f"{n.name}: reads the past cache as {n.op_type}, not Shape; cannot share the cache")
        a = {x.name: x.i for x in n.attribute}
        start, end = a.get("start", 0), a.get("end", 4)
        n.op_type = "Slice"
        del n.attribute[:]
        del n.input[:]
        n.input.extend([f"{p}/past_shape", int64_initializer(g, f"{p}/s{start}", [start], [1]),
                        int64_initializer(g, f"{p}/e{end}", [end], [1])])
    for vi in [*g.g.input, *g.g.output]:
        if vi.name.startswith(("past_key_values.", "present.")):
            d = vi.type.tensor_type.shape.dim[2]
            d.Clear()
            d.dim_param = CAPACITY
    g.refresh()  # the readers now read past_shape
    return True
