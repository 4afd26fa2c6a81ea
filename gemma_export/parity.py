"""The parity report as a typed record: what `verify` measured, each metric beside its threshold.

`exporter/verify.py` computes it (torch); this module only holds it, so a report can be
read back from an artifact's parity.json, returned by the Python API and printed without
torch. The table `format_report` prints is the one `gemma-export verify` shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gemma_export.errors import ArtifactError


@dataclass
class Metric:
    name: str
    measured: float
    threshold: float | None  # None: reported, not a criterion at this precision
    op: str  # "<=", ">=" or "info"
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        m = float(self.measured)
        if self.op == "info":
            self.passed = math.isfinite(m)
        else:
            self.passed = math.isfinite(m) and (m <= self.threshold if self.op == "<=" else m >= self.threshold)


@dataclass
class ParityReport:
    precision: str
    passed: bool
    metrics: list[Metric]
    prompts: list[int]  # prompt lengths
    steps: int
    seconds: float
    model: str = ""  # the PyTorch model compared with (its description, e.g. "preset:tiny-gemma1")
    # Per held-out domain: {"tokens", "top1", "perplexity_fp32", "perplexity",
    # "perplexity_increase", "mean_kl"} (empty without a tokenizer).
    heldout: dict[str, dict[str, float]] = field(default_factory=dict)

    def metric(self, name: str) -> Metric:
        """The metric called `name`, or whose name starts with `name` followed by " (" (the
        counts in brackets vary: "greedy top-1 agreement (192 steps)")."""
        for m in self.metrics:
            if m.name == name or m.name.startswith(name + " ("):
                return m
        raise KeyError(f"no metric {name!r}; the report has: {', '.join(m.name for m in self.metrics)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any, where: str = "parity.json") -> ParityReport:
        """A report written by `to_dict` (an artifact's parity.json); ArtifactError if it is not one."""
        try:
            metrics = []
            for m in raw["metrics"]:
                metric = Metric(str(m["name"]), float(m["measured"]), m["threshold"], str(m["op"]))
                if metric.passed != bool(m["passed"]):
                    raise ValueError(f"metric {metric.name!r}: 'passed' disagrees with measured and threshold")
                metrics.append(metric)
            report = cls(precision=str(raw["precision"]), passed=bool(raw["passed"]), metrics=metrics,
                         prompts=[int(n) for n in raw["prompts"]], steps=int(raw["steps"]),
                         seconds=float(raw["seconds"]), model=str(raw.get("model", "")),
                         heldout={str(d): {str(k): float(v) for k, v in r.items()}
                                  for d, r in (raw.get("heldout") or {}).items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: not a parity report ({e})") from None
        if report.passed != all(m.passed for m in metrics):
            raise ArtifactError(f"{where}: 'passed' disagrees with its metrics")
        return report


def format_report(report: ParityReport) -> str:
    rows = [("metric", "measured", "threshold", "pass")]
    for m in report.metrics:
        limit = "-" if m.op == "info" else f"{m.op} {m.threshold:g}"
        ok = "-" if m.op == "info" else ("yes" if m.passed else "NO")
        rows.append((m.name, f"{m.measured:.4g}", limit, ok))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "PASS" if report.passed else "FAIL"
    lines.append(f"parity {verdict}: {report.precision}, prompts of {report.prompts} tokens, "
                 f"{report.steps} decode steps")
    return "\n".join(lines)
