"""`gemma-export inspect DIR`: one screen about an artifact, read from its manifest alone.

Model, precision, size, the graphs and which provider runs each, the I/O contract, the
parity summary, and which consumers can open it. Reads no weights and runs nothing, so it
is instant on any artifact and needs neither torch nor a provider. No torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gemma_export.contract import LENGTH_WINDOW, KVLayout
from gemma_export.runtime.manifest import Manifest

# The other runtimes an export writes files for, in the order `inspect` lists them.
CLIENTS = ("onnxruntime-genai", "optimum", "transformers.js")


def inspect_artifact(artifact_dir: Path | str) -> dict[str, Any]:
    """The facts `inspect` prints, as one JSON-ready dict."""
    d = Path(artifact_dir)
    m = Manifest.read(d)
    cfg = m.config
    graphs: dict[str, list[str]] = {}
    for provider in ("cpu", "cuda"):
        graphs.setdefault(m.graph_file(provider), []).append(f"{provider} provider")
    if m.portable_model_file:
        graphs.setdefault(m.portable_model_file, []).append("contract-exact sibling (--portable)")
    for client in CLIENTS:
        if client in m.clients:
            graphs.setdefault(m.clients[client]["graph"], []).append(client)
    standard = not m.onnxruntime_ops
    return {
        "artifact": str(d),
        "model": m.source.description,
        "family": cfg.get("family"),
        "layers": cfg["num_hidden_layers"],
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg["vocab_size"],
        "max_length": m.max_length,
        "precision": m.precision.value,
        "recipe": m.recipe,
        "kept_fp32": m.kept_fp32,
        "size_bytes": m.size_bytes(),
        "files": {name: e.size for name, e in m.files.items()},
        "graphs": graphs,
        "kv_cache": m.layout.value,
        "io": {side: {name: _io_line(s) for name, s in m.io[side].items()} for side in ("inputs", "outputs")},
        "onnxruntime_ops": m.onnxruntime_ops,
        "parity": None if m.parity is None else {
            "passed": m.parity.get("passed"),
            "metrics": m.parity.get("metrics", {}),
        },
        "opens_in": {
            "gemma-export runtime": True,
            # A graph of standard ops only runs on any ONNX runtime; contrib ops need ONNX Runtime.
            "any ONNX runtime": standard,
            "ONNX Runtime": True,
            # Other runtimes, where the artifact carries the files each reads (exporter/clients.py).
            **{client: client in m.clients for client in CLIENTS},
        },
        "clients": m.clients,
        "tokenizer": m.tokenizer,
        "versions": m.versions,
    }


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable screen."""
    lines = [
        f"{info['artifact']}: {info['model']}",
        f"  precision   {info['precision']}  ({_recipe_line(info['recipe'])})",
        f"  model       Gemma {info['family']}, {info['layers']} layers, hidden {info['hidden_size']}, "
        f"vocab {info['vocab_size']}, context {info['max_length']}",
        f"  size        {info['size_bytes'] / 1e6:.1f} MB in {len(info['files'])} files",
        "  graphs",
    ]
    lines += [f"    {name:<26} {', '.join(uses)}" for name, uses in info["graphs"].items()]
    layout = info["kv_cache"]
    lines.append(f"  kv cache    {layout}" + (" (past and present one buffer, written in place)"
                                             if layout == KVLayout.SHARED.value else ""))
    lines.append("  inputs")
    lines += [f"    {n:<28} {s}" for n, s in _fold_kv(info["io"]["inputs"]).items()]
    lines.append("  outputs")
    lines += [f"    {n:<28} {s}" for n, s in _fold_kv(info["io"]["outputs"]).items()]
    ops = info["onnxruntime_ops"]
    lines.append(f"  ORT ops     {', '.join(ops) if ops else 'none (standard ONNX only)'}")
    p = info["parity"]
    if p is None:
        lines.append("  parity      not verified (run `gemma-export verify`)")
    else:
        lines.append(f"  parity      {'passed' if p['passed'] else 'FAILED'}")
        for name, m in p["metrics"].items():
            bound = f"{m['op']} {_num(m['threshold'])}" if m.get("threshold") is not None else "(info)"
            lines.append(f"    {name:<40} {_num(m['measured']):>10} {bound}")
    lines.append(f"  opens in    {', '.join(k for k, v in info['opens_in'].items() if v and k not in CLIENTS)}")
    for client in CLIENTS:
        files = info["clients"].get(client)
        why = "no (not written for this model family)" if info["clients"] else "no (exported before client files)"
        lines.append(f"    {client:<18} " + (_client_line(files) if files else why))
    return "\n".join(lines)


def _client_line(files: dict[str, str]) -> str:
    """"genai_config.json -> model.onnx", "onnx/model_quantized.onnx (dtype q8)"."""
    line = f"{files['config']} -> {files['graph']}" if "config" in files else files["graph"]
    return line + (f" (dtype {files['dtype']})" if "dtype" in files else "")


def _num(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _recipe_line(recipe: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in recipe.items() if k != "name" and not k.startswith("gptq_")) or "as traced"


def _io_line(spec: dict) -> str:
    """dtype and shape; a window entry (contract.py) with the newest positions it keeps."""
    line = f"{spec['dtype']} {spec['shape']}"
    return line + f" window (keeps >= {spec['keep']})" if spec.get("length") == LENGTH_WINDOW else line


def _fold_kv(specs: dict[str, str]) -> dict[str, str]:
    """past_key_values.{i}.key / .value shown once per shape, with the entries that have it
    (Gemma 4's global entries are wider than its sliding ones), where the first one was."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for n, s in specs.items():
        if n.count(".") == 2:
            prefix, i, kind = n.split(".")
            groups.setdefault((prefix, kind, s), []).append(i)
    out: dict[str, str] = {}
    for n, s in specs.items():
        if n.count(".") != 2:
            out[n] = s
            continue
        prefix, _, kind = n.split(".")
        out.setdefault(f"{prefix}.{_span(groups[(prefix, kind, s)])}.{kind}", s)
    return out


def _span(indices: list[str]) -> str:
    nums = [int(i) for i in indices]
    if len(nums) == 1:
        return f"{{{nums[0]}}}"
    if nums == list(range(nums[0], nums[0] + len(nums))):
        return f"{{{nums[0]}..{nums[-1]}}}"
    return "{" + ",".join(indices) + "}"
