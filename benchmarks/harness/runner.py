"""Orchestration: install the peers' venvs, build every system's artifact, and run one
worker process per measurement (`run_benchmarks.py _task NAME IN.json OUT.json` in the
system's venv), waiting for a quiet machine and rerunning a disturbed round."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness.systems import BY_NAME, VENVS, System

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
REPO = HERE.parent
DEV_PY = REPO / ".venv" / "bin" / "python"  # the dev venv: gemma-export, torch, transformers 5
ENTRY = HERE / "run_benchmarks.py"  # the script a worker process runs (`_task`)


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


def add_quiet_options(ap, unit: str) -> None:
    """The options Runner.wait_for_quiet and Runner.least_disturbed read (`unit`: what one
    measurement is called in the help, a round or a window)."""
    ap.add_argument("--busy-limit", type=float, default=0.3,
                    help="before each measurement, wait while other work keeps more CPU cores than this busy")
    ap.add_argument("--max-wait", type=float, default=900, help="longest wait for a quiet machine per measurement (s)")
    ap.add_argument("--max-wait-total", type=float, default=3600, help="longest total wait over the run (s)")
    ap.add_argument("--retries", type=int, default=2,
                    help=f"measure a {unit} again when other work used more than --busy-limit cores during it")


def machine_line() -> str:
    """CPU model, cores, memory, OS and Python: the line every results file carries."""
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
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


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

    def install_venvs(self, systems) -> None:
        """Install the peers' venvs the systems run in (with --skip-install, only check they
        exist); a venv that fails fails its systems, with the reason in `failures`."""
        for venv in dict.fromkeys(s.venv for s in systems if s.venv != "dev"):
            reason = None
            if self.args.skip_install:
                if not self.python(venv).exists():
                    reason = "install skipped (--skip-install) and no venv found"
            else:
                try:
                    self.install(venv)
                except StepFailed as e:
                    reason = f"install failed: {e}"
            if reason:
                for s in systems:
                    if s.venv == venv:
                        self.failures[s.name] = reason

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

    # -- artifacts ------------------------------------------------------------

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
            if system.artifact_of:
                path = self.prepare(BY_NAME[system.artifact_of])
            else:
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
            self.gemma_export("export", "--out", str(out), "--force", "--no-verify", "--json",
                              logname="prepare-ours-fp32")
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

    # -- workers --------------------------------------------------------------

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
        self.sh([str(py), str(ENTRY), "_task", task, str(inp), str(out)], logname, env=env,
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
                round_no: int, tag: str = "") -> dict:
        """One round of one system. The CPU time other processes took while it ran is
        measured too (all CPU time minus the worker's own); a round that shared the CPUs
        with other work is run again (--retries), the least disturbed one is kept."""
        payload = {
            "artifact": str(artifact), "prompt_ids": prompt, "new_tokens": self.args.new_tokens,
            "threads": self.args.threads, "repeats": self.args.repeats, "reference": reference,
            "system": system.name, "portable": system.portable,
        }

        def run_once(attempt: int, quiet: dict) -> dict:
            t0, i0, c0, w0 = *_cpu_times(), _children_cpu(), time.time()
            res = self.run_task(system.venv, f"measure_{system.family}", payload,
                                f"measure-{system.name}{tag}-r{round_no}", timeout=self.args.run_timeout)
            t1, i1, c1, w1 = *_cpu_times(), _children_cpu(), time.time()
            all_busy = ((t1 - t0) - (i1 - i0)) / os.sysconf("SC_CLK_TCK")
            res.update(quiet, other_cores_during=round(max(0.0, all_busy - (c1 - c0)) / (w1 - w0), 2),
                       attempts=attempt + 1)
            return res

        return self.least_disturbed(run_once, "run")

    def least_disturbed(self, run_once, what: str) -> dict:
        """Measure until other work used at most --busy-limit cores meanwhile: at most
        1 + --retries attempts, each after wait_for_quiet; the least disturbed result is kept.
        `run_once(attempt, quiet)` returns a result with `other_cores_during`."""
        best = None
        for attempt in range(self.args.retries + 1):
            res = run_once(attempt, self.wait_for_quiet())
            if best is None or res["other_cores_during"] < best["other_cores_during"]:
                best = res
            if res["other_cores_during"] <= self.args.busy_limit:
                break
            log(f"  other work used {res['other_cores_during']:.2f} cores during the {what}: "
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
