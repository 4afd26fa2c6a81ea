#!/usr/bin/env python3
"""gemma-export's artifacts beside peer runtimes on the real Gemma 3 270M, on this machine.

    .venv/bin/python benchmarks/run_benchmarks.py                 # install, prepare, measure, write RESULTS.md
    .venv/bin/python benchmarks/run_benchmarks.py --skip-install --only ours genai-int4 llamacpp

Systems (see benchmarks/README.md for what each peer setup does):
  ours-{fp32,int8,int4,gguf}      `gemma-export export` / `quantize`, timed by gemma_export.runtime.bench
  genai-{fp32,int8,int4}          onnxruntime-genai's model builder on the same fp32 weights
  llamacpp-q4_k_m                 llama-cpp-python on the very GGUF file our default model loads
  optimum-{fp32,int8}             Optimum's ONNX export, int8 by its dynamic quantizer
  transformers-fp32               Hugging Face transformers (PyTorch eager) loading the same GGUF:
                                  the reference every system's greedy tokens are compared with

Protocol, the same for every system: batch 1, greedy, the first --prompt-tokens ids of
gemma_export/exporter/data/eval_corpus.txt (<bos> first, our tokenizer) fed as ids (no peer
tokenizes anything), then --new-tokens decode steps with EOS ignored, --threads intra-op
threads. Each (system, round) is one fresh subprocess in the system's own venv: load, one
warm-up run, --repeats timed runs, median; its peak RSS is that process's ru_maxrss.
Rounds interleave (A, B, C, A, B, C, ...) so machine drift hits every system alike; the
reported number is the median over rounds. Agreement with the reference: top-1 agreement
teacher-forced on the reference's tokens (each step is fed the reference's previous token),
and how many of the first 32 free-running greedy tokens equal the reference's.

A step that fails (install, build, run) marks the systems it feeds as failed with one line
of reason in RESULTS.md; it never stops the run. This file is also the worker that runs
inside each venv (`run_benchmarks.py _task NAME ARGS.json OUT.json`), so nothing but the
standard library is imported at module level.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CORPUS = REPO / "gemma_export" / "exporter" / "data" / "eval_corpus.txt"
DEV_PY = REPO / ".venv" / "bin" / "python"  # the dev venv: gemma-export, torch, transformers 5

# -- the peers' environments (exact versions: a rerun measures the same software) ------------

# llama.cpp compiles on install (scikit-build-core + CMake). Only the CPU backend is built,
# for this CPU (-march=native: what a user building from source gets), without the
# multimodal library, tests, examples, tools or server: about 6 minutes on 2 cores.
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF "
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)


@dataclass(frozen=True)
class Venv:
    requirements: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""


VENVS: dict[str, Venv] = {
    # The builder imports transformers 5 only names (Qwen3.5, Gemma 4), so it needs
    # transformers 5; torch 2.13.0 resolves to the CPU wheel on this machine's disk (as in
    # constraints.txt). onnxruntime is pinned to the version our runtime uses, so the ORT
    # rows differ only in graph and runtime glue.
    "genai": Venv((
        "onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "torch==2.13.0", "transformers==5.24.0",
        "onnx==1.23.2", "onnx-ir", "safetensors==0.8.0", "sentencepiece==0.2.3", "protobuf==7.36.2",
        "tqdm", "numpy==2.4.6",
    )),
    "llamacpp": Venv(
        ("llama-cpp-python==0.3.36", "numpy==2.4.6"),
        env=(("CMAKE_ARGS", LLAMA_CMAKE_ARGS), ("CMAKE_BUILD_PARALLEL_LEVEL", "2")),
    ),
    # optimum-onnx 0.1.0 requires transformers < 4.58 (and optimum ~= 2.1).
    "optimum": Venv((
        "optimum-onnx[onnxruntime]==0.1.0", "onnxruntime==1.32.0", "transformers==4.57.6", "torch==2.13.0",
        "onnx==1.23.2", "sentencepiece==0.2.3", "protobuf", "numpy==2.4.6",
    )),
}


@dataclass(frozen=True)
class System:
    name: str
    family: str  # ours | genai | llamacpp | optimum | transformers (also the worker's name)
    precision: str  # what the table shows
    venv: str  # "dev" or a key of VENVS
    label: str  # the table's system column
    compare_to: tuple[str, ...] = ()  # ours only: the peers this row is divided by


SYSTEMS: tuple[System, ...] = (
    System("ours-fp32", "ours", "fp32", "dev", "gemma-export", ("genai-fp32", "optimum-fp32", "transformers-fp32")),
    System("ours-int8", "ours", "int8 (MatMulNBits, block 32)", "dev", "gemma-export", ("genai-int8", "optimum-int8")),
    System("ours-int4", "ours", "int4 (MatMulNBits, block 32)", "dev", "gemma-export", ("genai-int4",)),
    System("ours-gguf", "ours", "GGUF blocks (Q4_K_M mix)", "dev", "gemma-export", ("llamacpp-q4_k_m", "genai-int4")),
    System("genai-fp32", "genai", "fp32", "genai", "onnxruntime-genai"),
    System("genai-int8", "genai", "int8 (MatMulNBits, block 32)", "genai", "onnxruntime-genai"),
    System("genai-int4", "genai", "int4 (MatMulNBits, block 32)", "genai", "onnxruntime-genai"),
    System("llamacpp-q4_k_m", "llamacpp", "GGUF Q4_K_M (same file)", "llamacpp", "llama.cpp (llama-cpp-python)"),
    System("optimum-fp32", "optimum", "fp32", "optimum", "Optimum ONNX + ORTModel"),
    System("optimum-int8", "optimum", "int8 dynamic (QOperator)", "optimum", "Optimum ONNX + ORTModel"),
    System("transformers-fp32", "transformers", "fp32 (reference)", "dev", "transformers (PyTorch eager)"),
)
BY_NAME = {s.name: s for s in SYSTEMS}
REFERENCE = "transformers-fp32"


class StepFailed(Exception):
    """A step that makes the systems depending on it fail, with a one-line reason."""


def one_line(text: str, limit: int = 220) -> str:
    """The last informative line of an error output (tracebacks end with the exception)."""
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    skip = ("warning", "note:", "hint:", "[notice]", "error: subprocess-exited-with-error", "×", "╰─>", "│")
    for ln in reversed(lines):
        if not ln.lower().startswith(skip):
            return ln[:limit]
    return (lines[-1] if lines else "no output")[:limit]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- orchestration: venvs --------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work: Path = args.work_dir.resolve()
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.failures: dict[str, str] = {}  # system -> reason
        self.install_notes: dict[str, str] = {}
        self.prep_notes: dict[str, str] = {}
        self.prepared: dict[str, Path] = {}
        self.prep_failed: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.total_waited = 0.0

    def python(self, venv: str) -> Path:
        return DEV_PY if venv == "dev" else self.work / "venvs" / venv / "bin" / "python"

    def sh(self, cmd: list[str], logname: str, *, env: dict | None = None, timeout: float = 7200,
           cwd: Path | None = None) -> str:
        """Run a command, output to logs/<logname>.log; StepFailed with its last line on failure."""
        path = self.logs / f"{logname}.log"
        full_env = {**os.environ, **(env or {})}
        log(f"$ {shlex.join(str(c) for c in cmd)}  (log: {path.relative_to(self.work)})")
        with open(path, "w") as f:
            f.write(f"$ {shlex.join(str(c) for c in cmd)}\n")
            f.flush()
            try:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, timeout=timeout,
                                   cwd=cwd or REPO)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"timed out after {timeout:.0f} s ({path.name})") from None
            except OSError as e:
                raise StepFailed(f"cannot run {cmd[0]}: {e}") from None
        out = path.read_text(errors="replace")
        if p.returncode != 0:
            raise StepFailed(f"exit {p.returncode}: {one_line(out)}")
        return out

    def install(self, name: str) -> None:
        spec = VENVS[name]
        py = self.python(name)
        t0 = time.time()
        if not py.exists():
            self.sh([sys.executable, "-m", "venv", str(py.parent.parent)], f"venv-{name}")
            self.sh([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], f"pip-upgrade-{name}")
        out = self.sh([str(py), "-m", "pip", "install", *spec.requirements], f"install-{name}", env=dict(spec.env))
        fresh = "Successfully installed" in out
        self.timings[f"install {name}" + ("" if fresh else " (already installed: pip check only)")] = time.time() - t0

    # -- orchestration: artifacts ------------------------------------------------------------

    def artifact_dir(self, system: str) -> Path:
        return self.work / "artifacts" / system

    def gemma_export(self, *args: str, logname: str) -> None:
        self.sh([str(DEV_PY.parent / "gemma-export"), *args], logname)

    def prepare(self, system: System) -> Path:
        """Build (or reuse) what the system runs; returns the path the worker loads. A
        failure is remembered, so systems built from a failed one fail without a retry."""
        if system.name in self.prep_failed:
            raise StepFailed(f"{system.name}: {self.prep_failed[system.name]}")
        if system.name in self.prepared:
            return self.prepared[system.name]
        t0 = time.time()
        (self.work / "artifacts").mkdir(parents=True, exist_ok=True)
        try:
            path = getattr(self, f"prepare_{system.family}")(system)
        except StepFailed as e:
            self.prep_failed[system.name] = str(e)
            raise
        finally:
            self.timings.setdefault(f"prepare {system.name}", time.time() - t0)
        self.prepared[system.name] = path
        return path

    def _done(self, d: Path) -> bool:
        return (d / ".complete").is_file()

    def _mark(self, d: Path, info: dict | None = None) -> None:
        (d / ".complete").write_text(json.dumps(info or {}, indent=1))

    def prepare_ours(self, system: System) -> Path:
        out = self.artifact_dir(system.name)
        if (out / "manifest.json").is_file():
            return out
        prec = system.name.split("-", 1)[1]
        if prec == "fp32":
            self.gemma_export("export", "--out", str(out), "--force", "--no-verify", "--json", logname="prepare-ours-fp32")
        else:
            src = self.prepare(BY_NAME["ours-fp32"])
            self.gemma_export("quantize", str(src), "--precision", prec, "--out", str(out), "--force",
                              "--no-verify", "--json", logname=f"prepare-{system.name}")
        return out

    def gguf_path(self) -> Path:
        p = self.work / "gguf_path.txt"
        if not p.is_file():
            self.sh([str(DEV_PY), "-c", "from gemma_export.models.load import bundled_gguf_path; "
                     f"open({str(p)!r}, 'w').write(str(bundled_gguf_path()))"], "gguf-path")
        return Path(p.read_text().strip())

    def hf_dir(self) -> Path:
        """A Hugging Face folder of the same fp32 weights, for the builders that read one."""
        d = self.work / "hf-gemma3-270m"
        if not self._done(d):
            self.run_task("dev", "prep_hf", {"out": str(d), "gguf": str(self.gguf_path())}, "prepare-hf-dir",
                          timeout=1800)
        return d

    def prepare_genai(self, system: System) -> Path:
        out = self.artifact_dir(system.name)
        if self._done(out):
            return out
        hf = self.hf_dir()
        prec = system.name.split("-", 1)[1]
        shutil.rmtree(out, ignore_errors=True)
        res = self.run_task("genai", "genai_build", {"hf_dir": str(hf), "out": str(out), "precision": prec,
                                                    "cache": str(self.work / "cache" / system.name)},
                            f"prepare-{system.name}", timeout=3600)
        if res.get("note"):
            self.prep_notes["genai"] = res["note"]
        self._mark(out, res)
        return out

    def prepare_llamacpp(self, system: System) -> Path:
        return self.gguf_path()

    def prepare_optimum(self, system: System) -> Path:
        out = self.artifact_dir(system.name)
        if self._done(out):
            return out
        if system.name == "optimum-fp32":
            shutil.rmtree(out, ignore_errors=True)
            text = self.sh([str(self.python("optimum").parent / "optimum-cli"), "export", "onnx", "--model",
                            str(self.hf_dir()), "--task", "text-generation-with-past", "--framework", "pt", str(out)],
                           "prepare-optimum-fp32", timeout=3600)
            flagged = [ln for ln in text.splitlines() if "values not close enough" in ln]
            if flagged:
                self.prep_notes["optimum-fp32"] = (
                    f"optimum-cli's own export check (ONNX vs PyTorch, atol 1e-5) flagged {len(flagged)} outputs, "
                    f"first: {flagged[0].strip().lstrip('-[x] ')}; the export still completed (exit 0)")
            if not (out / "model.onnx").is_file():
                raise StepFailed("optimum-cli export onnx wrote no model.onnx")
        else:
            src = self.prepare(BY_NAME["optimum-fp32"])
            shutil.rmtree(out, ignore_errors=True)
            res = self.run_task("optimum", "optimum_quantize", {"src": str(src), "out": str(out)},
                                "prepare-optimum-int8", timeout=3600)
            self.prep_notes["optimum-int8"] = res.get("note", "")
        self._mark(out)
        return out

    def prepare_transformers(self, system: System) -> Path:
        return self.gguf_path()

    # -- orchestration: workers --------------------------------------------------------------

    def run_task(self, venv: str, task: str, payload: dict, logname: str, timeout: float = 1800) -> dict:
        """Run `_task` in a venv's python; the task's JSON result, or StepFailed."""
        py = self.python(venv)
        if not py.exists():
            raise StepFailed(f"no python in venv {venv!r} (install skipped or failed)")
        tmp = self.work / "tmp"
        tmp.mkdir(exist_ok=True)
        inp, out = tmp / f"{logname}.in.json", tmp / f"{logname}.out.json"
        inp.write_text(json.dumps(payload))
        out.unlink(missing_ok=True)
        env = {"PYTHONPATH": "", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
        self.sh([str(py), str(Path(__file__).resolve()), "_task", task, str(inp), str(out)], logname, env=env,
                timeout=timeout)
        if not out.is_file():
            raise StepFailed(f"task {task} wrote no result ({logname}.log)")
        return json.loads(out.read_text())

    def wait_for_quiet(self) -> dict:
        """Wait while other processes keep the CPUs busy (sampled while none of ours runs).
        At most --max-wait per measurement and --max-wait-total over the whole run; after
        that, measure anyway (the per-round table shows the load each round saw)."""
        waited = 0.0
        while True:
            busy = busy_cores()
            if busy <= self.args.busy_limit:
                break
            left = min(self.args.max_wait - waited, self.args.max_wait_total - self.total_waited)
            if left <= 0:
                log(f"  measuring anyway: {busy:.2f} cores busy after waiting {waited:.0f} s")
                break
            if waited == 0:
                log(f"  {busy:.2f} cores busy with other work (> {self.args.busy_limit}): waiting")
            step = min(20.0, left)
            time.sleep(step)
            waited += step
            self.total_waited += step
        return {"busy_cores_before": round(busy, 2), "loadavg_before": round(os.getloadavg()[0], 2),
                "waited_s": round(waited)}

    def measure(self, system: System, artifact: Path, prompt: list[int], reference: list[int] | None,
                round_no: int) -> dict:
        """One round of one system. The CPU time other processes took while it ran is
        measured too (all CPU time minus the worker's own); a round that shared the CPUs
        with other work is run again (--retries), the least disturbed one is kept."""
        payload = {
            "artifact": str(artifact), "prompt_ids": prompt, "new_tokens": self.args.new_tokens,
            "threads": self.args.threads, "repeats": self.args.repeats, "reference": reference,
            "system": system.name,
        }
        best = None
        for attempt in range(self.args.retries + 1):
            quiet = self.wait_for_quiet()
            t0, i0, c0, w0 = *_cpu_times(), _children_cpu(), time.time()
            res = self.run_task(system.venv, f"measure_{system.family}", payload,
                                f"measure-{system.name}-r{round_no}", timeout=self.args.run_timeout)
            t1, i1, c1, w1 = *_cpu_times(), _children_cpu(), time.time()
            all_busy = ((t1 - t0) - (i1 - i0)) / os.sysconf("SC_CLK_TCK")
            res.update(quiet, other_cores_during=round(max(0.0, all_busy - (c1 - c0)) / (w1 - w0), 2),
                       attempts=attempt + 1)
            if best is None or res["other_cores_during"] < best["other_cores_during"]:
                best = res
            if res["other_cores_during"] <= self.args.busy_limit:
                break
            log(f"  other work used {res['other_cores_during']:.2f} cores during the run: "
                + ("measuring again" if attempt < self.args.retries else "keeping the least disturbed run"))
        return best


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return sum(v), v[3] + v[4]  # all jiffies, idle + iowait


def busy_cores(seconds: float = 3.0) -> float:
    """CPU cores kept busy by anything over a short sample (0 .. cpu_count)."""
    t0, i0 = _cpu_times()
    time.sleep(seconds)
    t1, i1 = _cpu_times()
    total = t1 - t0
    return (1 - (i1 - i0) / total) * (os.cpu_count() or 1) if total > 0 else 0.0


def dir_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))


# -- the report ----------------------------------------------------------------------------


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
        "| system | precision | decode tok/s (round min–max) | prefill 128 (s) | peak RSS | artifact size | top-1 vs transformers fp32 "
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
    pairs = [(s.name, p) for s in SYSTEMS if s.family == "ours" for p in s.compare_to
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


# -- main ------------------------------------------------------------------------------------


def select(only: list[str] | None) -> list[System]:
    if not only:
        return list(SYSTEMS)
    chosen = []
    for s in SYSTEMS:
        if any(o in (s.name, s.family) for o in only):
            chosen.append(s)
    unknown = [o for o in only if o not in BY_NAME and o not in {s.family for s in SYSTEMS}]
    if unknown:
        names = ", ".join([*BY_NAME, *dict.fromkeys(s.family for s in SYSTEMS)])
        raise SystemExit(f"error: unknown system {unknown[0]!r}; known: {names}")
    return chosen


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=HERE / ".work", help="venvs, artifacts, logs (default benchmarks/.work)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every system")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each a fresh process per system)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per round after one warm-up")
    ap.add_argument("--skip-install", action="store_true", help="use the venvs already in --work-dir")
    ap.add_argument("--only", nargs="+", metavar="SYSTEM", help="systems or families: " + ", ".join(BY_NAME))
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="report to write")
    ap.add_argument("--report-only", action="store_true", help="rewrite --results from --work-dir/results.json")
    ap.add_argument("--busy-limit", type=float, default=0.3,
                    help="before each measurement, wait while other work keeps more CPU cores than this busy")
    ap.add_argument("--max-wait", type=float, default=900, help="longest wait for a quiet machine per measurement (s)")
    ap.add_argument("--max-wait-total", type=float, default=3600, help="longest total wait over the run (s)")
    ap.add_argument("--retries", type=int, default=2,
                    help="measure a round again when other work used more than --busy-limit cores during it")
    ap.add_argument("--run-timeout", type=float, default=1800, help="longest one measurement process may run (s)")
    args = ap.parse_args(argv)
    if min(args.threads, args.new_tokens, args.prompt_tokens, args.rounds, args.repeats) < 1:
        ap.error("--threads, --new-tokens, --prompt-tokens, --rounds and --repeats must be >= 1")
    if args.report_only:
        src = args.work_dir / "results.json"
        if not src.is_file():
            ap.error(f"--report-only: {src} not found (run the benchmarks first)")
        write_results(json.loads(src.read_text()), args.results.resolve())
        log(f"wrote {args.results} from {src}")
        return 0
    if not DEV_PY.exists():
        ap.error(f"{DEV_PY} not found: run `make test` (or the Makefile's venv step) first")
    systems = select(args.only)
    t_start = time.time()
    runner = Runner(args)
    log(f"systems: {', '.join(s.name for s in systems)}; work dir {runner.work}")

    # 1. Install each peer's venv (a failure fails that venv's systems).
    for venv in dict.fromkeys(s.venv for s in systems if s.venv != "dev"):
        if args.skip_install:
            if not runner.python(venv).exists():
                for s in systems:
                    if s.venv == venv:
                        runner.failures[s.name] = "install skipped (--skip-install) and no venv found"
            continue
        try:
            runner.install(venv)
        except StepFailed as e:
            for s in systems:
                if s.venv == venv:
                    runner.failures[s.name] = f"install failed: {e}"

    # 2. The prompt and the reference tokens (transformers fp32), once, cached.
    prompt: list[int] = []
    ref: list[int] | None = None
    try:
        prompt = runner.run_task("dev", "prompt_ids", {"n": args.prompt_tokens}, "prompt-ids")["ids"]
    except StepFailed as e:
        log(f"cannot make the prompt: {e}")
        for s in systems:
            runner.failures.setdefault(s.name, f"no prompt: {e}")
        systems = []
    ref_cache = runner.work / f"reference-p{args.prompt_tokens}-n{args.new_tokens}.json"
    if prompt:
        if ref_cache.is_file() and json.loads(ref_cache.read_text()).get("prompt_ids") == prompt:
            ref = json.loads(ref_cache.read_text())["tokens"]
        else:
            try:
                r = runner.run_task("dev", "measure_transformers", {
                    "artifact": str(runner.gguf_path()), "prompt_ids": prompt, "new_tokens": args.new_tokens,
                    "threads": args.threads, "repeats": 0, "reference": None, "system": REFERENCE,
                }, "reference", timeout=args.run_timeout)
                ref = r["tokens"]
                ref_cache.write_text(json.dumps({"prompt_ids": prompt, "tokens": ref}))
            except StepFailed as e:
                log(f"no reference tokens: {e}")

    # 3. Build every artifact before measuring anything (so timings never overlap a build).
    ready: list[tuple[System, Path]] = []
    for s in systems:
        if s.name in runner.failures:
            continue
        try:
            path = runner.prepare(s)
            ready.append((s, path))
        except StepFailed as e:
            runner.failures[s.name] = f"prepare failed: {e}"
            log(f"{s.name}: prepare failed: {e}")

    # 4. Interleaved rounds.
    results: dict[str, list[dict]] = {}
    for rnd in range(1, args.rounds + 1):
        for s, path in ready:
            log(f"round {rnd}/{args.rounds}: {s.name}")
            try:
                res = runner.measure(s, path, prompt, ref, rnd)
                res["ok"] = True
                res.setdefault("size_bytes", dir_size(path))
                results.setdefault(s.name, []).append(res)
                log(f"  prefill {res['prefill_s']:.3f} s, decode {res['decode_tps']:.1f} tok/s, "
                    f"RSS {fmt_bytes(res['peak_rss_bytes'])}")
            except StepFailed as e:
                results.setdefault(s.name, []).append({"ok": False, "error": str(e)})
                if not any(r.get("ok") for r in results[s.name]):
                    runner.failures[s.name] = f"run failed: {e}"
                log(f"  failed: {e}")
    for name, rs in results.items():
        if any(r.get("ok") for r in rs):
            runner.failures.pop(name, None)

    # 5. The report.
    wall = time.time() - t_start
    command = "python benchmarks/run_benchmarks.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    notes = [
        "decode tok/s = decode forward passes per second after the prefill (each feeds one token and "
        "yields the next token's logits); prefill = one forward over the prompt up to the first token's logits.",
        "peak RSS = ru_maxrss of the measuring process: it includes each runtime's own imports "
        "(torch for Optimum's ORTModel and for transformers) and, for transformers, loading and dequantizing the GGUF.",
        "artifact size = all files the system loads (ONNX graph + external data + configs/tokenizer; the .gguf file).",
        "top-1 = share of the decode positions where the system's argmax equals the reference's token when fed "
        "the reference's own previous tokens; 'first 32' compares free-running greedy outputs; prefix = tokens "
        "identical before the first difference.",
    ]
    report = {
        "results": results, "reference": ref, "prompt": prompt, "failures": runner.failures,
        "step_notes": {**runner.install_notes, **runner.prep_notes}, "timings": runner.timings,
        "meta": {
            "gguf": runner.gguf_path().name if prompt else "?", "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_line(),
            "command": command.strip(), "wall_s": wall, "notes": notes,
        },
    }
    (runner.work / "results.json").write_text(json.dumps(report, indent=1))
    write_results(report, args.results.resolve())
    log(f"wrote {args.results} in {wall / 60:.1f} min; failed: {', '.join(runner.failures) or 'none'}")
    return 0


# == tasks: run inside a venv by `_task` (each imports only what its venv has) ================


def _versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def _rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _argmax(x) -> int:
    import numpy as np

    return int(np.argmax(np.asarray(x).reshape(-1)))


def _timed(run_once, repeats: int) -> dict:
    """run_once() -> (prefill_s, decode_s, forwards, tokens). Run 0 warms up; medians of the rest."""
    prefills, rates, tokens = [], [], None
    for r in range(repeats + 1):
        p, d, forwards, toks = run_once()
        tokens = toks
        if r or repeats == 0:
            prefills.append(p)
            rates.append(forwards / d)
    return {"prefill_s": statistics.median(prefills), "decode_tps": statistics.median(rates), "tokens": tokens,
            "runs": [(round(a, 4), round(b, 2)) for a, b in zip(prefills, rates)]}


def task_prompt_ids(a: dict) -> dict:
    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf
    from gemma_export.models.load import bundled_gguf_path
    from gemma_export.runtime.bench import prompt_ids
    from gemma_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_bytes(tokenizer_from_gguf(bundled_gguf_path()))
    return {"ids": prompt_ids(tok, a["n"])}


def task_prep_hf(a: dict) -> dict:
    """A Hugging Face Gemma 3 text folder holding our loader's fp32 weights (dequantized from
    the GGUF, norms un-shifted), with the flat RoPE fields older readers expect."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf
    from gemma_export.models.load import load_model

    out = Path(a["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ck = load_model(None)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in ck.model.state_dict().items()}
    # Tied head: readers that look for lm_head.weight find it (a copy: safetensors refuses
    # shared storage); transformers re-ties it to the embedding on load.
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = ck.config.to_hf_dict()
    cfg.pop("layer_types", None)  # with sliding_window_pattern, as in Gemma 3's released config
    cfg.update(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], rope_theta=ck.config.rope_theta,
        rope_local_base_freq=ck.config.rope_local_theta, rope_scaling=None, sliding_window_pattern=6,
        torch_dtype="float32", use_cache=True, final_logit_softcapping=None, attn_logit_softcapping=None,
        # strict config dataclasses (huggingface_hub 1.x+) reject 256.0 for an int field
        query_pre_attn_scalar=int(ck.config.query_pre_attn_scalar),
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    eos = cfg["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "pad_token_id": cfg["pad_token_id"],
         "do_sample": False}, indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer_from_gguf(a["gguf"]))
    # tokenizer.json / tokenizer_config.json: transformers' own conversion of the GGUF vocabulary.
    gguf = Path(a["gguf"])
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    (out / ".complete").write_text("{}")
    return {"files": sorted(p.name for p in out.iterdir())}


def task_genai_build(a: dict) -> dict:
    """onnxruntime-genai's model builder, fp32 / int8 / int4 for CPU. First as shipped; if
    that fails on Gemma 3's RoPE config (transformers 5 nests rope_parameters per layer type,
    the builder reads a flat `rope_type`), once more with the config flattened in memory
    (rope_theta 1e6 global, rope_local_base_freq 1e4) - the only change."""
    import contextlib
    import io

    import onnxruntime_genai.models.builder as b  # noqa: F401  (adds the builder dir to sys.path)

    def build(fix: bool):
        kw = b.parse_extra_options(None, a["hf_dir"], a["out"], a["precision"], "cpu", a["cache"], None)
        cfg = kw["hf_details"]["hf_config"]
        rp = getattr(cfg, "rope_parameters", None)
        if fix and isinstance(rp, dict) and "full_attention" in rp:
            cfg.rope_parameters = dict(rp["full_attention"])
            cfg.rope_theta = rp["full_attention"]["rope_theta"]
            cfg.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        b.create_model(None, a["hf_dir"], a["out"], a["precision"], "cpu", a["cache"], **kw)

    note = ""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            build(fix=False)
    except Exception as e:  # the builder raises whatever its model code raises
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        if "rope" not in first:
            raise
        print(buf.getvalue()[-4000:])
        print(f"builder as shipped failed: {first}; retrying with the flattened RoPE config", flush=True)
        note = (f"the builder as shipped fails on this Gemma 3 config under transformers "
                f"{_versions('transformers').get('transformers')} ({first}); the artifacts were built with "
                "the same builder after flattening the in-memory config's rope_parameters to the global entry "
                "and setting rope_theta=1e6, rope_local_base_freq=1e4")
        shutil.rmtree(a["out"], ignore_errors=True)
        build(fix=True)
    shutil.rmtree(a["cache"], ignore_errors=True)
    return {"note": note, "files": sorted(os.listdir(a["out"]))}


def task_optimum_quantize(a: dict) -> dict:
    """Optimum's dynamic int8 quantization (ORTQuantizer), the config for this CPU's ISA."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" in flags:
        qc, isa = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False), "avx512_vnni"
    elif "avx512f" in flags:
        qc, isa = AutoQuantizationConfig.avx512(is_static=False, per_channel=False), "avx512"
    else:
        qc, isa = AutoQuantizationConfig.avx2(is_static=False, per_channel=False), "avx2"
    q = ORTQuantizer.from_pretrained(a["src"], file_name="model.onnx")
    q.quantize(save_dir=a["out"], quantization_config=qc)
    src = Path(a["src"])
    for f in src.iterdir():  # config, tokenizer: what ORTModelForCausalLM reads beside the graph
        if f.suffix in (".json", ".model", ".txt") and not (Path(a["out"]) / f.name).exists():
            shutil.copy(f, a["out"])
    return {"note": f"AutoQuantizationConfig.{isa}(is_static=False, per_channel=False)",
            "files": sorted(os.listdir(a["out"]))}


def task_measure_ours(a: dict) -> dict:
    """gemma_export.runtime.bench.bench_artifact for the timing (its own median over repeats);
    teacher forcing afterwards through the same runtime functions."""
    import numpy as np

    from gemma_export.runtime.bench import bench_artifact, prompt_ids
    from gemma_export.runtime.generate import decode_one_token, load_generator, prefill

    ids = a["prompt_ids"]
    res = bench_artifact(a["artifact"], prompt_tokens=len(ids), new_tokens=a["new_tokens"], threads=a["threads"],
                         repeats=a["repeats"])
    rss = res["peak_rss_bytes"]
    gen = load_generator(a["artifact"], provider="cpu", threads=a["threads"])
    if prompt_ids(gen.tokenizer, len(ids)) != ids:
        raise RuntimeError("the artifact's tokenizer gives another prompt than the shared ids")
    tf = []
    if a["reference"]:
        state = prefill(gen.session, [ids])
        for tok in a["reference"]:
            tf.append(_argmax(state.logits[0]))
            state = decode_one_token(gen.session, state, np.array([tok]))
    return {"prefill_s": res["prefill_seconds"], "decode_tps": res["decode_tokens_per_second"],
            "tokens": res["greedy_tokens"], "tf_argmax": tf, "peak_rss_bytes": rss,
            "versions": _versions("gemma-export", "onnxruntime", "numpy")}


def task_measure_genai(a: dict) -> dict:
    """onnxruntime-genai's own loop: append_tokens (prefill), generate_next_token (greedy in C++)."""
    import onnxruntime_genai as og

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    t0 = time.perf_counter()
    config = og.Config(a["artifact"])
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": th, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    total = len(ids) + n + 1
    # The builder's sliding-window GroupQueryAttention refuses a KV cache shorter than the
    # window (512), so max_length is at least the window; the loops stop after n tokens.
    window = json.loads((Path(a["artifact"]) / "genai_config.json").read_text())["model"]["decoder"].get(
        "sliding_window", {}).get("window_size", 0)

    def new_generator():
        params = og.GeneratorParams(model)
        # min_length keeps EOS from ending the run early (it only masks EOS until then).
        params.set_search_options(do_sample=False, max_length=max(total, window), min_length=total, batch_size=1)
        return og.Generator(model, params)

    def run_once():
        g = new_generator()
        t0 = time.perf_counter()
        g.append_tokens(ids)  # prefill: runs the model over the prompt
        t1 = time.perf_counter()
        for _ in range(n + 1):
            # The first call picks token 1 from the prefill's logits; each later call runs one
            # decode forward and picks the next: n forwards, like the other systems' loops.
            g.generate_next_token()
        t2 = time.perf_counter()
        seq = list(g.get_sequence(0))
        return t1 - t0, t2 - t1, n, [int(x) for x in seq[len(ids):len(ids) + n]]

    res = _timed(run_once, a["repeats"])
    rss = _rss()
    tf = []
    if a["reference"]:
        g = new_generator()
        g.append_tokens(ids)
        for tok in a["reference"]:
            tf.append(_argmax(g.get_logits()))
            g.append_tokens([tok])
    return {**res, "tf_argmax": tf, "peak_rss_bytes": rss, "load_s": load_s,
            "versions": _versions("onnxruntime-genai", "onnxruntime", "numpy")}


def task_measure_llamacpp(a: dict) -> dict:
    """llama-cpp-python's Llama.eval over the ids; greedy = argmax of the last logits."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    t0 = time.perf_counter()
    llm = Llama(model_path=a["artifact"], n_ctx=max(512, len(ids) + n + 8), n_batch=512, n_ubatch=512,
                n_threads=th, n_threads_batch=th, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0

    vocab = llm.n_vocab()
    ctx = getattr(llm, "ctx", None) or llm._ctx.ctx

    def last_logits():
        # Llama.eval keeps no logits unless logits_all (sampling moved into llama.cpp's
        # sampler); read the last output row from the context, no copy.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))

    def run_once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(n):
            tok = _argmax(last_logits())
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, out

    res = _timed(run_once, a["repeats"])
    rss = _rss()
    tf = []
    if a["reference"]:
        llm.reset()
        llm.eval(ids)
        for tok in a["reference"]:
            tf.append(_argmax(last_logits()))
            llm.eval([tok])
    return {**res, "tf_argmax": tf, "peak_rss_bytes": rss, "load_s": load_s,
            "size_bytes": Path(a["artifact"]).stat().st_size,
            "versions": _versions("llama_cpp_python", "numpy")}


def task_measure_optimum(a: dict) -> dict:
    """Optimum's ORTModelForCausalLM forward, past_key_values fed back (what its generate does)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    torch.set_num_threads(th)
    d = Path(a["artifact"])
    file_name = "model_quantized.onnx" if (d / "model_quantized.onnx").exists() else "model.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = th
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(str(d), file_name=file_name, provider="CPUExecutionProvider",
                                                session_options=so, use_cache=True, use_io_binding=False)
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids], dtype=torch.long)

    @torch.inference_mode()
    def forward(tok_ids, past, total):
        return model(input_ids=tok_ids, attention_mask=torch.ones((1, total), dtype=torch.long),
                     past_key_values=past, use_cache=True)

    @torch.inference_mode()
    def run_once():
        t0 = time.perf_counter()
        out = forward(x, None, len(ids))
        t1 = time.perf_counter()
        toks = []
        for i in range(n):
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
            out = forward(torch.tensor([[tok]]), out.past_key_values, len(ids) + i + 1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, toks

    res = _timed(run_once, a["repeats"])
    rss = _rss()
    tf = []
    if a["reference"]:
        with torch.inference_mode():
            out = forward(x, None, len(ids))
            for i, tok in enumerate(a["reference"]):
                tf.append(int(out.logits[0, -1].argmax()))
                out = forward(torch.tensor([[tok]]), out.past_key_values, len(ids) + i + 1)
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
               and not (f.suffix in (".onnx", ".onnx_data", ".data") and not f.name.startswith(file_name)))
    return {**res, "tf_argmax": tf, "peak_rss_bytes": rss, "load_s": load_s, "size_bytes": size,
            "versions": _versions("optimum-onnx", "optimum", "onnxruntime", "transformers", "torch")}


def task_measure_transformers(a: dict) -> dict:
    """The reference: transformers loading the same GGUF, fp32, eager PyTorch, DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    torch.set_num_threads(th)
    gguf = Path(a["artifact"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids], dtype=torch.long)

    @torch.inference_mode()
    def run_once():
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        toks = []
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, toks

    res = _timed(run_once, a["repeats"])
    return {**res, "tf_argmax": [], "peak_rss_bytes": _rss(), "load_s": load_s, "size_bytes": gguf.stat().st_size,
            "versions": _versions("transformers", "torch", "gguf")}


def _task_main(argv: list[str]) -> int:
    name, inp, out = argv
    fn = globals().get(f"task_{name}")
    if fn is None:
        print(f"unknown task {name}", file=sys.stderr)
        return 2
    try:
        res = fn(json.loads(Path(inp).read_text()))
    except Exception as e:
        traceback.print_exc()
        print(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}", file=sys.stderr)
        return 1
    Path(out).write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_task":
        sys.exit(_task_main(sys.argv[2:]))
    sys.exit(main())
