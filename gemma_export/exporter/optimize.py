"""Applies the graph rewrites for ONNX Runtime in a fixed order and reports what it made;
also the skeleton copy that lets the pipeline save the pre-fusion graph beside the fused one.
The rules live one per file in exporter/rewrites/ (pattern, a check that says why a
candidate did not match, rewrite).

    optimize_graph(proto).fusions -> {"rms_norm": 37, "skip_rms_norm": 24, "gelu_tanh": 6}

Order matters: skip_rms_norm fuses the residual Add into norms that rms_norm made.
The rewritten graph keeps the I/O contract, except that, given the config (integer
recipes), the attention fusion is followed by the shared-cache pass, which moves the KV
cache to shared buffers (io_spec's "shared" variant; the pipeline ships the graph from
before the attention fusion as model.portable.onnx). The fused graph uses ONNX Runtime's
contrib ops, so the manifest lists them, and `--no-optimize` keeps the portable plain-op graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from gemma_export.errors import ArtifactError
from gemma_export.exporter.lazy_weights import goes_external
from gemma_export.exporter.rewrites import Graph, Rule, ensure_ms_opset
from gemma_export.exporter.rewrites.attention import AttentionRule
from gemma_export.exporter.rewrites.pack_projections import PackProjectionsRule
from gemma_export.exporter.rewrites.gelu import GeluRule
from gemma_export.exporter.rewrites.rms_norm import RMSNormRule
from gemma_export.exporter.rewrites.shared_cache import share_kv_cache
from gemma_export.exporter.rewrites.skip_rms_norm import SkipRMSNormRule

RULES: tuple[Rule, ...] = (RMSNormRule(), SkipRMSNormRule(), GeluRule())


def apply_rule(g: Graph, rule: Rule) -> tuple[int, dict[str, int]]:
    """Apply `rule` until nothing matches; return (fired, why-not counts)."""
    fired, reasons = 0, {}
    progress = True
    while progress:
        progress = False
        for node in list(g.g.node):
            m = rule.match(g, node)
            if isinstance(m, str):
                if not m.startswith("not a"):
                    reasons[m] = reasons.get(m, 0) + 1
                continue
            rule.rewrite(g, m)
            fired += 1
            progress = True
            break  # the node list changed: rescan
    return fired, reasons


@dataclass
class Optimized:
    """What optimize_graph made of a graph (rewritten in place)."""

    fusions: dict[str, int] = field(default_factory=dict)  # rule name -> times it fired (manifest graph.fusions)
    # The graph just before the attention fusion, as a `skeleton` (given the config; else None):
    # the contract-exact sibling the artifact ships next to the fused graph.
    portable: onnx.ModelProto | None = None
    shared_cache: bool = False  # the KV cache became one buffer per tensor (rewrites/shared_cache.py)


def optimize_graph(proto: onnx.ModelProto, rules: tuple[Rule, ...] = RULES, cfg=None) -> Optimized:
    """Apply `rules`, then (given the model's config: the integer recipes) the stacking of
    projections that share an input, the attention fusion and the shared-cache pass (a
    contract change)."""
    extra = (PackProjectionsRule(),) if cfg is not None else ()
    g = Graph(proto)
    out = Optimized()
    for rule in (*rules, *extra):
        out.fusions[rule.name], _ = apply_rule(g, rule)
    ensure_ms_opset(proto)  # before the skeleton, which uses the contrib ops too
    if cfg is not None:
        out.portable = skeleton(proto)
        rule = AttentionRule(cfg)
        out.fusions[rule.name], _ = apply_rule(g, rule)
        out.shared_cache = out.fusions[rule.name] > 0 and share_kv_cache(g, cfg)
    return out


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the graph without its large initializers' data (those are named in
    `proto.graph.initializer` with no payload: `fill_from` points them at the weights
    file once the fused graph has been saved). No weight is copied in memory."""
    s = onnx.ModelProto()
    s.ir_version = proto.ir_version
    s.opset_import.extend(proto.opset_import)
    s.producer_name, s.producer_version = proto.producer_name, proto.producer_version
    s.graph.name = proto.graph.name
    for part in ("node", "input", "output", "value_info"):
        getattr(s.graph, part).extend(getattr(proto.graph, part))
    for t in proto.graph.initializer:
        if goes_external(t):
            s.graph.initializer.add(name=t.name)  # placeholder: filled from the saved fused graph
        else:
            s.graph.initializer.append(t)
    return s


def fill_from(skel: onnx.ModelProto, saved: onnx.ModelProto) -> onnx.ModelProto:
    """Point the skeleton's large initializers at the external data `saved` (a graph
    saved with external data, sharing those initializers by name) already wrote."""
    by_name = {t.name: t for t in saved.graph.initializer}
    for t in skel.graph.initializer:
        if not t.HasField("data_type"):
            src = by_name.get(t.name)
            if src is None or src.data_location != onnx.TensorProto.EXTERNAL:
                raise ArtifactError(f"{t.name}: the fused graph's weights file does not hold it; "
                                    "cannot write the portable graph")
            t.CopyFrom(src)
    return skel
