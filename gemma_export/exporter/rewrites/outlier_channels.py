"""A product's outlier input channels taken out of MatMulNBits' int8 activation rounding.

    a ─ MatMulNBits(W) ─ y     ->     a ─ Mul(keep) ─ MatMulNBits(W) ──────────── Add ─ y
                                      a ─ Gather(channels, axis=-1) ─ MatMul(Wc) ─┘

At accuracy_level 4 MatMulNBits rounds its input to int8 per block of K (block_size
channels, one scale each, set by the block's largest |a|). Gemma's activations have a few
channels far larger than the rest, and one of them in a block leaves its neighbours a few
levels of the int8 grid. Here those channels are zeroed in MatMulNBits' input (`keep` is
1 elsewhere) and their share of the product is computed apart in fp32 from the very
values the node's blocks dequantize to (`Wc` = W[:, channels]^T, [k, N]): the sum is the
same product, only the rounding of the other channels is finer. The node's codes, scales
and zero points are untouched (the gguf recipe's blocks stay the file's).

`split_outlier_channels(g, channels)` takes {input tensor: channel indices} from the
recipe's calibration (exporter/calibrate.py: outlier_channels) and rewrites every
MatMulNBits reading one of those tensors; it returns how many it rewrote.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gemma_export.exporter.blocks import Blocks, unpack
from gemma_export.exporter import lazy_weights
from gemma_export.exporter.rewrites import Graph, add_initializer


def node_columns(g: Graph, node: onnx.NodeProto, channels: np.ndarray) -> np.ndarray:
    """W[:, channels]^T [k, N] fp32: the columns of the weight MatMulNBits `node` computes
    with (its codes, scales and zero points; the default zero point 2^(bits-1) when none)."""
    a = {x.name: x.i for x in node.attribute}
    bits, bs, n, k = a["bits"], a["block_size"], a["N"], a["K"]
    kb = k // bs
    blocks = sorted(set((channels // bs).tolist()))  # only the K-blocks holding a channel
    codes = unpack(lazy_weights.array(g.inits[node.input[1]]), bits, bs)[:, blocks]  # [N, nb, bs]
    scales = lazy_weights.array(g.inits[node.input[2]]).reshape(n, kb)[:, blocks]
    if len(node.input) > 3 and node.input[3]:
        zp = lazy_weights.array(g.inits[node.input[3]])
        if bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :kb]
        zp = zp.reshape(n, kb)[:, blocks]
    else:
        zp = np.full((n, len(blocks)), 2 ** (bits - 1), np.uint8)
    w = Blocks(codes, scales, zp, bits).dequantize().reshape(n, len(blocks), bs)  # [N, nb, bs]
    where = {b: i for i, b in enumerate(blocks)}
    cols = np.stack([w[:, where[c // bs], c % bs] for c in channels.tolist()])  # [k, N]
    return np.ascontiguousarray(cols, dtype=np.float32)


def split_outlier_channels(g: Graph, channels: dict[str, np.ndarray]) -> dict[str, int]:
    """Rewrite each MatMulNBits whose input is a key of `channels` (see the module doc).
    Products reading one input share its Mul and Gather, so projections that read the same
    tensor still read the same tensor (pack_projections stacks them afterwards). Returns
    {node name: channels taken out} for the nodes rewritten."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.g.node:
        if n.op_type == "MatMulNBits" and len(channels.get(n.input[0], ())) > 0:
            readers.setdefault(n.input[0], []).append(n)
    done: dict[str, int] = {}
    before: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes to put in front of it
    after: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes to put right behind it
    for a, nodes in readers.items():
        idx = np.asarray(sorted(channels[a]), np.int64)
        k = {x.name: x.i for x in nodes[0].attribute}["K"]
        keep = np.ones(k, np.float32)
        keep[idx] = 0.0
        tag = a.strip("/").replace("/", ".")
        kept, part = f"{a}/outlier_kept", f"{a}/outlier_channels"
        base = nodes[0].name.rsplit("/", 1)[0]
        before[id(nodes[0])] = [
            helper.make_node("Mul", [a, add_initializer(g, numpy_helper.from_array(keep, f"{tag}.outlier_keep"))],
                             [kept], name=f"{base}/OutlierKeep"),
            helper.make_node("Gather", [a, add_initializer(g, numpy_helper.from_array(idx, f"{tag}.outlier_index"))],
                             [part], name=f"{base}/OutlierGather", axis=-1),
        ]
        for node in nodes:
            y = node.output[0]
            cols = add_initializer(g, numpy_helper.from_array(
                node_columns(g, node, idx), node.input[1].rsplit(".", 1)[0] + ".outlier_columns"))
            name = node.name.rsplit("/", 1)[0]
            node.input[0], node.output[0] = kept, f"{y}/rounded_part"
            after[id(node)] = [
                helper.make_node("MatMul", [part, cols], [f"{y}/outlier_part"], name=f"{name}/OutlierMatMul"),
                helper.make_node("Add", [f"{y}/rounded_part", f"{y}/outlier_part"], [y], name=f"{name}/OutlierAdd"),
            ]
            done[node.name] = int(idx.size)
    # One rebuild at the end: the node objects held above belong to the list being rebuilt.
    out = []
    for n in g.g.node:
        out += [*before.get(id(n), []), n, *after.get(id(n), [])]
    del g.g.node[:]
    g.g.node.extend(out)
    g.refresh()
    return done
