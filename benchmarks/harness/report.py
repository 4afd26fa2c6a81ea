"""RESULTS.md from a run's report (what results.json holds): the table, ours ÷ peer, the
rounds, notes, failures, software versions and time spent."""

from __future__ import annotations

import statistics
from pathlib import Path

from harness.systems import BY_NAME, REFERENCE, SYSTEMS


def agreement(tokens: list[int] | None, tf_argmax: list[int] | None, ref: list[int] | None) -> dict:
    if not ref:
        return {}
    out: dict = {}
    if tokens:
        n = min(32, len(ref), len(tokens))
        out["first32"] = sum(a == b for a, b in zip(tokens[:n], ref[:n]))
        prefix = 0
        for a, b in zip(tokens, ref):
            if a != b:
                break
            prefix += 1
        out["prefix"] = prefix
    if tf_argmax:
        n = min(len(tf_argmax), len(ref))
        out["top1"] = sum(a == b for a, b in zip(tf_argmax[:n], ref[:n])) / n
        out["top1_n"] = n
    return out


def summarize(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if r.get("ok")]
    if not ok:
        return {}
    return {
        "prefill_s": statistics.median(r["prefill_s"] for r in ok),
        "decode_tps": statistics.median(r["decode_tps"] for r in ok),
        "decode_range": (min(r["decode_tps"] for r in ok), max(r["decode_tps"] for r in ok)),
        "peak_rss": max(r["peak_rss_bytes"] for r in ok),
        "per_round": [(round(r["prefill_s"], 4), round(r["decode_tps"], 2)) for r in ok],
    }


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def write_results(report: dict, path: Path) -> None:
    """RESULTS.md from the run's report (what results.json holds)."""
    results, ref, meta = report["results"], report["reference"], report["meta"]
    failures, step_notes, timings = report["failures"], report["step_notes"], report["timings"]
    rows = []
    summaries = {name: summarize(r) for name, r in results.items()}
    lines = [
        "# Benchmarks: gemma-export beside peer runtimes",
        "",
        f"Real Gemma 3 270M (the bundled GGUF, `{meta['gguf']}`), batch 1, greedy, a {meta['prompt_tokens']}-token "
        f"prompt (the first {meta['prompt_tokens']} tokens of `gemma_export/exporter/data/eval_corpus.txt`, "
        f"`<bos>` first) fed as ids to every system, {meta['new_tokens']} new tokens (EOS ignored), "
        f"{meta['threads']} threads, {meta['rounds']} interleaved rounds of (1 warm-up + {meta['repeats']} timed runs) "
        "per system, each round a fresh process. Numbers are medians over rounds of per-round medians.",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']}",
        f"- Command: `{meta['command']}`",
        f"- Total wall time: {meta['wall_s'] / 60:.1f} min (installs, artifact builds and measurement)",
        "",
        "| system | precision | decode tok/s (round min–max) | prefill 128 (s) | peak RSS | artifact size "
        "| top-1 vs transformers fp32 "
        "(teacher-forced) | first 32 greedy tokens equal | ours ÷ peer (decode tok/s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines[-2] = lines[-2].replace("prefill 128", f"prefill {meta['prompt_tokens']}")
    selected = [s for s in SYSTEMS if s.name in results or s.name in failures]
    for s in selected:
        summ = summaries.get(s.name) or {}
        fail = failures.get(s.name)
        if fail and not summ:
            lines.append(f"| {s.label} `{s.name}` | {s.precision} | failed | — | — | — | — | — | {fail} |")
            continue
        last = next((r for r in reversed(results.get(s.name, [])) if r.get("ok")), {})
        ag = agreement(last.get("tokens"), last.get("tf_argmax"), ref)
        ratio = []
        for peer in s.compare_to:
            ps = summaries.get(peer)
            if ps and summ:
                ratio.append(f"×{summ['decode_tps'] / ps['decode_tps']:.2f} vs {peer}")
        top1 = f"{ag['top1'] * 100:.1f}% of {ag['top1_n']}" if "top1" in ag else "—"
        f32 = f"{ag['first32']}/32 (prefix {ag['prefix']})" if "first32" in ag else "—"
        if s.name == REFERENCE:
            top1, f32 = "reference", "reference"
        lo, hi = summ["decode_range"]
        spread = f" ({lo:.0f}–{hi:.0f})" if len(summ["per_round"]) > 1 else ""
        lines.append(
            f"| {s.label} `{s.name}` | {s.precision} | {summ['decode_tps']:.1f}{spread} | {summ['prefill_s']:.3f} | "
            f"{fmt_bytes(summ['peak_rss'])} | {fmt_bytes(last.get('size_bytes'))} | {top1} | {f32} | "
            f"{'; '.join(ratio) or ''} |"
        )
        rows.append(s.name)

    # Ratios, in full: ours against each peer it is compared with.
    pairs = [(s.name, p) for s in SYSTEMS for p in s.compare_to
             if summaries.get(s.name) and summaries.get(p)]
    if pairs:
        lines += [
            "",
            "## Ours ÷ peer",
            "",
            "Decode and prefill as speed-ups (> 1: ours faster); RSS and size as ours ÷ peer (< 1: ours smaller).",
            "",
            "| ours | peer | decode speed | prefill speed | peak RSS | artifact size |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for o, p in pairs:
            so, sp = summaries[o], summaries[p]
            zo = next((r.get("size_bytes") for r in results[o] if r.get("ok")), None)
            zp = next((r.get("size_bytes") for r in results[p] if r.get("ok")), None)
            size = f"{zo / zp:.2f}" if zo and zp and BY_NAME[p].family != "transformers" else "—"
            lines.append(f"| {o} | {p} | ×{so['decode_tps'] / sp['decode_tps']:.2f} | "
                         f"×{sp['prefill_s'] / so['prefill_s']:.2f} | {so['peak_rss'] / sp['peak_rss']:.2f} | {size} |")

    lines += ["", "## Per round", "", "(prefill s, decode tok/s) for each round. Other work: CPU cores that other "
              "processes used while the round ran (all CPU time minus the measuring process's own), the 1-minute "
              "load average before it, seconds waited for a quiet machine, attempts (a disturbed round is rerun).",
              "", "| system | rounds | other work: cores during / load before / waited s / attempts |",
              "| --- | --- | --- |"]
    for name in rows:
        ok = [r for r in results[name] if r.get("ok")]
        lines.append(f"| {name} | {' · '.join(f'({a}, {b})' for a, b in summaries[name]['per_round'])} | "
                     + ", ".join(f"{r.get('other_cores_during')} / {r.get('loadavg_before')} / {r.get('waited_s')}"
                                 f" / {r.get('attempts')}" for r in ok) + " |")

    lines += ["", "## Notes", ""]
    notes = meta.get("notes", [])
    for k, v in step_notes.items():
        if v:
            notes.append(f"{k}: {v}")
    for n in notes:
        lines.append(f"- {n}")
    if failures:
        lines += ["", "## Failures", ""]
        for k, v in failures.items():
            lines.append(f"- `{k}`: {v}")
    versions = {}
    for name in rows:
        last = next((r for r in reversed(results[name]) if r.get("ok")), {})
        versions[name] = last.get("versions", {})
    lines += ["", "## Software", "", "| system | versions |", "| --- | --- |"]
    for name, v in versions.items():
        lines.append(f"| {name} | {', '.join(f'{k} {x}' for k, x in v.items())} |")
    lines += ["", "## Time spent", "", "| step | seconds |", "| --- | ---: |"]
    for k, v in timings.items():
        lines.append(f"| {k} | {v:.0f} |")
    lines.append("")
    path.write_text("\n".join(lines))
