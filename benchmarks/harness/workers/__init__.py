"""The workers: what runs inside a system's venv, one module per peer (plus `inputs`, made
in the dev venv, and `common`, shared by all). Each task reads a JSON payload and returns a
JSON-able dict; `run_task` is the `run_benchmarks.py _task NAME IN.json OUT.json` entry.
Modules are imported only for the task asked, and import their peer only inside the task."""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path

# task name -> module under harness.workers (the function is task_<name>)
TASKS = {
    "prompt_ids": "inputs",
    "prep_hf": "inputs",
    "measure_ours": "ours",
    "genai_build": "genai",
    "measure_genai": "genai",
    "measure_llamacpp": "llamacpp",
    "optimum_quantize": "optimum_ort",
    "measure_optimum": "optimum_ort",
    "measure_transformers": "transformers_ref",
}


def run_task(argv: list[str]) -> int:
    name, inp, out = argv
    if name not in TASKS:
        print(f"unknown task {name}", file=sys.stderr)
        return 2
    fn = getattr(importlib.import_module(f"harness.workers.{TASKS[name]}"), f"task_{name}")
    try:
        res = fn(json.loads(Path(inp).read_text()))
    except Exception as e:
        traceback.print_exc()
        print(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
        return 1
    Path(out).write_text(json.dumps(res))
    return 0
