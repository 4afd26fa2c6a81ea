"""Graph rewrites for ONNX Runtime, applied in a fixed order; each reports how often it
fired. The rules live one per file in exporter/rewrites/ (pattern, a check that says why
a candidate did not match, rewrite).

    optimize_graph(proto) -> {"rms_norm": 37, "skip_rms_norm": 24, "gelu_tanh": 6}

Order matters: skip_rms_norm fuses the residual Add into norms that rms_norm made.
The rewritten graph keeps the I/O contract; it uses ONNX Runtime's contrib ops, so the
manifest lists them and `--no-optimize` keeps the portable plain-op graph.
"""

from __future__ import annotations

import onnx
from gemma_export.exporter.rewrites import Graph, Rule, ensure_ms_opset
from gemma_export.exporter.rewrites.attention import AttentionRule
from gemma_export.exporter.rewrites.pack_projections import PackProjectionsRule
from gemma_export.exporter.rewrites.gelu import GeluRule
from gemma_export.exporter.rewrites.rms_norm import RMSNormRule
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


def optimize_graph(proto: onnx.ModelProto, rules: tuple[Rule, ...] = RULES, cfg=None) -> dict[str, int]:
    """Apply `rules`, then (given the model's config: the integer recipes) the attention
    fusion and the stacking of projections that share an input."""
    if cfg is not None:
        rules = (*rules, AttentionRule(cfg), PackProjectionsRule())
    g = Graph(proto)
    counts = {}
    for rule in rules:
        counts[rule.name], _ = apply_rule(g, rule)
    ensure_ms_opset(proto)
    return counts
