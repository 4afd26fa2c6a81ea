"""The `gemma-export` command. Thin: each command parses, calls one function of the Python
API (api.py: export, quantize, verify, load; the code a Python user calls), prints. stdout
carries the result only (a table, text, or with --json one JSON object); progress goes to
stderr. Errors the user can act on print one line, `Error: ...`, on stderr and exit
non-zero (usage 2, failure 1, parity miss 3); GEMMA_EXPORT_DEBUG=1 shows the traceback
instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from gemma_export import __version__
from gemma_export.errors import GemmaExportError, ParityError

app = typer.Typer(
    name="gemma-export",
    help="Export Gemma models to ONNX with a KV cache, prove parity with PyTorch, and run them on ONNX Runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemma-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Export Gemma models to ONNX with a KV cache, prove parity with PyTorch, and run them on ONNX Runtime."""


def _emit(obj: dict, json_out: bool, text: str | None) -> None:
    if json_out:
        typer.echo(json.dumps(obj, default=str))
    elif text is not None:
        typer.echo(text)


@contextmanager
def _result_even_on_miss(json_out: bool):
    """A parity miss is still a result: print it as success would (the table, or with
    --json the one JSON object, its parity.passed false), then let main exit 3."""
    try:
        yield
    except ParityError as e:
        if e.result:
            _emit(e.result, json_out, e.result.get("parity_table"))
        raise


# -- export / verify ---------------------------------------------------------------------------


# Options shared by export and quantize: one definition each.
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty --out.")]
VerifyOpt = Annotated[bool, typer.Option("--verify/--no-verify", help="Check parity against PyTorch afterwards.")]
OptimizeOpt = Annotated[
    bool, typer.Option("--optimize/--no-optimize", help="Fuse for ONNX Runtime (off: portable plain-op graph).")
]
StepsOpt = Annotated[int, typer.Option(help="Greedy decode steps compared during verify.")]
BlockSizeOpt = Annotated[Optional[int], typer.Option(help="int8/int4: quantization block size (default 32).")]
SymmetricOpt = Annotated[
    Optional[bool],
    typer.Option("--symmetric/--asymmetric", help="int8/int4: symmetric, or zero points per block "
                 "(defaults: int8 symmetric, int4 asymmetric).", show_default=False),
]
AccuracyOpt = Annotated[
    Optional[int], typer.Option(help="MatMulNBits compute: 0 = fp32, 4 = int8 activations (default 4).")
]
GptqOpt = Annotated[
    Optional[bool],
    typer.Option("--gptq/--rtn", help="int8/int4: GPTQ rounding calibrated on text the model samples, or round "
                 "to nearest (defaults: int8 RTN, int4 GPTQ).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object; no progress.")]
PortableOpt = Annotated[
    bool, typer.Option("--portable", help="Run the artifact's contract-exact graph (int8/int4/gguf: "
                       "model.portable.onnx, not the fused in-place-cache graph; other artifacts: model.onnx).")
]


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--steps")


def _emit_artifact(artifact, t0: float, json_out: bool) -> None:
    res = artifact.result(time.perf_counter() - t0)
    text = f"wrote {res['out']} ({res['size_bytes'] / 1e6:.1f} MB, {res['seconds']} s)"
    if res["parity_table"]:
        text = res["parity_table"] + "\n" + text
    _emit(res, json_out, text)


@app.command()
def export(
    model: Annotated[
        Optional[str],
        typer.Argument(help="Checkpoint directory, .gguf file or preset name. Default: the bundled real Gemma 3 270M."),
    ] = None,
    out: OutOpt = ...,
    precision: Annotated[
        str, typer.Option(help="fp32 (reference graph), fp16 / bf16 (mixed precision, for CUDA), int8, int4, or gguf "
                               "(the GGUF's own blocks, carried exactly).")
    ] = "fp32",
    max_length: Annotated[
        Optional[int], typer.Option(help="Context length the artifact advertises (default: the model's).")
    ] = None,
    force: ForceOpt = False,
    verify: VerifyOpt = True,
    optimize: OptimizeOpt = True,
    steps: StepsOpt = 64,
    block_size: BlockSizeOpt = None,
    symmetric: SymmetricOpt = None,
    accuracy_level: AccuracyOpt = None,
    gptq: GptqOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Export MODEL to an ONNX artifact with a KV cache, then verify parity with PyTorch."""
    from gemma_export import api
    from gemma_export.contract import Precision

    prec = _choice(Precision, precision, "--precision")
    _check_steps(steps)
    t0 = time.perf_counter()
    with _result_even_on_miss(json_out):
        artifact = api.export(
            model, out, precision=prec, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
            gptq=gptq, max_length=max_length, force=force, verify=verify, steps=steps, optimize=optimize,
            progress=not json_out,
        )
    _emit_artifact(artifact, t0, json_out)


@app.command()
def quantize(
    src: Annotated[Path, typer.Argument(help="An fp32 artifact directory written by `export`.")],
    precision: Annotated[
        str, typer.Option(help="fp16 / bf16 (mixed precision, for CUDA), int8, int4, or gguf (the GGUF source's "
                               "own blocks).")
    ] = ...,
    out: OutOpt = ...,
    block_size: BlockSizeOpt = None,
    symmetric: SymmetricOpt = None,
    accuracy_level: AccuracyOpt = None,
    gptq: GptqOpt = None,
    model: Annotated[Optional[str], typer.Option(help="Source model for verify (default: the manifest's).")] = None,
    force: ForceOpt = False,
    verify: VerifyOpt = True,
    optimize: OptimizeOpt = True,
    steps: StepsOpt = 64,
    json_out: JsonOpt = False,
) -> None:
    """Make an fp16 / bf16 / int8 / int4 / gguf artifact from an fp32 one, then verify parity with PyTorch."""
    from gemma_export import api
    from gemma_export.contract import Precision

    prec = _choice(Precision, precision, "--precision")
    _check_steps(steps)
    t0 = time.perf_counter()
    with _result_even_on_miss(json_out):
        artifact = api.quantize(
            src, out, precision=prec, block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
            gptq=gptq, model=model, force=force, verify=verify, steps=steps, optimize=optimize,
            progress=not json_out,
        )
    _emit_artifact(artifact, t0, json_out)


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory written by `export`.")],
    model: Annotated[
        Optional[str], typer.Option(help="Source model to compare with (default: the one the manifest names).")
    ] = None,
    steps: StepsOpt = 64,
    json_out: JsonOpt = False,
) -> None:
    """Check an artifact's checksums and its parity with the PyTorch model; writes parity.json."""
    from gemma_export import api

    _check_steps(steps)
    with _result_even_on_miss(json_out):
        report = api.verify(artifact, model=model, steps=steps, progress=not json_out)
    res = api.verify_result(artifact, report)
    _emit(res, json_out, res["parity_table"])


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    json_out: JsonOpt = False,
) -> None:
    """Show an artifact: model, precision, size, graphs per provider, I/O contract, parity, consumers."""
    from gemma_export.runtime.inspect import format_inspect, inspect_artifact

    info = inspect_artifact(artifact)
    _emit(info, json_out, format_inspect(info))


# -- generate ----------------------------------------------------------------------------------


@app.command()
def generate(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    prompt: Annotated[
        Optional[list[str]], typer.Argument(help="Prompt text(s); '-' or none reads stdin. Several make a batch.")
    ] = None,
    prompt_file: Annotated[
        Optional[Path], typer.Option("--prompt-file", "-f", help="File with one prompt per line (a batch).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats (1 = off).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (reproducible output).")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option(
        "--chat", help="Wrap the prompt in the model family's chat turn format (Gemma 4 has its own).")] = False,
    truncate: Annotated[bool, typer.Option(
        "--truncate", help="Cut a prompt too long for the context to its <bos> and last tokens (default: refuse it)."
    )] = False,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    portable: PortableOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object; no streaming.")] = False,
) -> None:
    """Generate text with an exported artifact on ONNX Runtime (streams for one prompt)."""
    from gemma_export import api
    from gemma_export.runtime.generate import SamplingConfig
    from gemma_export.runtime.session import Provider

    prov = _choice(Provider, provider, "--provider")
    prompts = _read_prompts(prompt, prompt_file)
    cfg = SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop or ()),
    )
    cfg.validate()
    gen = api.load(artifact, provider=prov, threads=threads, portable=portable)
    if not json_out:
        typer.echo(f"provider: {gen.session.provider.value}", err=True)
    stream = not json_out and len(prompts) == 1
    on_text = (lambda _b, t: (sys.stdout.write(t), sys.stdout.flush())) if stream else None
    res = gen.generate_result(prompts, cfg, chat=chat, on_text=on_text, truncate=truncate)
    if stream:
        sys.stdout.write("\n")
    obj = {
        "provider": res.provider,
        "results": [
            {"prompt": p, "text": t, "finish_reason": r, "prompt_tokens": n, "new_tokens": len(ids)}
            for p, t, r, n, ids in zip(prompts, res.texts, res.finish_reasons, res.prompt_tokens, res.token_ids)
        ],
        "seconds_to_first_token": round(res.seconds_to_first_token, 4),
        "decode_tokens_per_second": round(res.decode_tokens_per_second, 2),
    }
    if json_out:
        _emit(obj, True, None)
    elif not stream:
        for p, t in zip(prompts, res.texts):
            typer.echo(f"### {p}\n{t}\n")
    if not json_out:
        typer.echo(
            f"[{sum(len(i) for i in res.token_ids)} tokens, first after {res.seconds_to_first_token:.2f} s, "
            f"{res.decode_tokens_per_second:.1f} tok/s]",
            err=True,
        )


@app.command()
def bench(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    prompt_tokens: Annotated[int, typer.Option(
        help="Prompt length (tokens of the shipped corpus, repeated past its end).")] = 128,
    new_tokens: Annotated[int, typer.Option(help="Greedy tokens decoded.")] = 128,
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads.")] = 2,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "cpu",
    repeats: Annotated[int, typer.Option(help="Timed runs after one warm-up; the median is reported.")] = 3,
    portable: PortableOpt = False,
    full_cache: Annotated[bool, typer.Option(
        "--full-cache", help="Keep every position for sliding layers too (the portable graph on CPU bounds them to "
                             "their window by default).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time prefill and decode of an artifact at batch 1 (see benchmarks/ for peers side by side)."""
    from gemma_export.runtime.bench import bench_artifact
    from gemma_export.runtime.session import Provider

    prov = _choice(Provider, provider, "--provider")
    res = bench_artifact(artifact, prompt_tokens=prompt_tokens, new_tokens=new_tokens, threads=threads,
                         provider=prov, repeats=repeats, portable=portable, full_cache=full_cache)
    text = (
        f"{res['precision']} on {res['provider']} ({threads} threads, {res['kv_cache']} cache): "
        f"prefill {res['prompt_tokens']} tokens "
        f"{res['prefill_seconds'] * 1000:.0f} ms, decode {res['decode_tokens_per_second']:.1f} tok/s, "
        f"peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB, artifact {res['size_bytes'] / 1e6:.0f} MB"
    )
    _emit({k: v for k, v in res.items() if k != "greedy_tokens"} | {"greedy_tokens": res["greedy_tokens"]}, json_out,
          text)


@app.command()
def serve(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 for every interface).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    provider: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="ONNX Runtime intra-op threads.")] = None,
    max_batch: Annotated[int, typer.Option(help="Most requests decoded together in one batch.")] = 16,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting for a batch slot; beyond it 429.")] = 64,
    prefill_chunk: Annotated[
        int, typer.Option(help="Prompt tokens per prefill step while other requests decode (bounds their stall).")
    ] = 256,
    api_key: Annotated[
        Optional[str], typer.Option(envvar="GEMMA_EXPORT_API_KEY", show_envvar=True,
                                    help="Require 'Authorization: Bearer KEY' on every route but /health.")
    ] = None,
    served_model_name: Annotated[
        Optional[str], typer.Option(help="Model name in /v1/models and responses (default: the directory's name).")
    ] = None,
    cors_origin: Annotated[
        Optional[list[str]], typer.Option(help="Allow browser calls from this origin (repeatable; none by default).")
    ] = None,
    verify_checksums: Annotated[
        bool, typer.Option("--verify-checksums/--no-verify-checksums",
                           help="Check every artifact file's sha256 against the manifest before serving.")
    ] = True,
    portable: PortableOpt = False,
    log_prompts: Annotated[bool, typer.Option("--log-prompts", help="Log prompts and the access log (off: "
                                              "prompts never reach the logs).")] = False,
    grace: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish after SIGTERM.")] = 10.0,
) -> None:
    """Serve an artifact with an OpenAI-compatible API (completions, chat, streaming) and continuous batching."""
    from gemma_export.errors import RuntimeConfigError
    from gemma_export.runtime.session import Provider

    try:
        from gemma_export.server.main import ServeOptions, serve as run_server
    except ImportError as e:
        raise RuntimeConfigError(f"serve needs the server packages ({e.name} is missing): "
                                 "pip install 'gemma-export[serve]'") from None

    prov = _choice(Provider, provider, "--provider")
    for value, hint, low in ((port, "--port", 0), (max_batch, "--max-batch", 1), (max_queue, "--max-queue", 0),
                             (prefill_chunk, "--prefill-chunk", 1)):
        if value < low:
            raise typer.BadParameter(f"must be >= {low}", param_hint=hint)
    if api_key is not None and not api_key.strip():
        raise typer.BadParameter("must not be empty", param_hint="--api-key")
    run_server(artifact, ServeOptions(
        host=host, port=port, provider=prov.value, threads=threads, max_batch=max_batch, max_queue=max_queue,
        prefill_chunk=prefill_chunk, api_key=api_key, served_model_name=served_model_name,
        cors_origins=tuple(cors_origin or ()), verify_checksums=verify_checksums, portable=portable,
        log_prompts=log_prompts, grace=grace,
    ))


def _read_prompts(prompt: list[str] | None, prompt_file: Path | None) -> list[str]:
    if prompt_file is not None:
        if prompt:
            raise typer.BadParameter("give prompts as arguments or --prompt-file, not both", param_hint="--prompt-file")
        try:
            lines = [ln.rstrip("\n") for ln in prompt_file.read_text().splitlines()]
        except OSError as e:
            raise typer.BadParameter(f"cannot read {prompt_file}: {e.strerror}", param_hint="--prompt-file") from e
        prompts = [ln.replace("\\n", "\n") for ln in lines if ln.strip()]
    elif not prompt or prompt == ["-"]:
        if sys.stdin is None or sys.stdin.isatty():
            raise typer.BadParameter("no prompt given (pass text, '-' for stdin, or --prompt-file)",
                                     param_hint="PROMPT")
        prompts = [sys.stdin.read()]
    else:
        prompts = list(prompt)
    if not prompts or any(not p for p in prompts):
        raise typer.BadParameter("empty prompt", param_hint="PROMPT")
    return prompts


def _choice(enum_cls, value: str, hint: str):
    try:
        return enum_cls(value)
    except ValueError:
        known = ", ".join(e.value for e in enum_cls)
        raise typer.BadParameter(f"{value!r} is not one of {known}", param_hint=hint) from None


# -- entry point -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Console script: one place that turns exceptions into messages and exit codes."""
    debug = bool(os.environ.get("GEMMA_EXPORT_DEBUG"))
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="gemma-export")
        return rv if isinstance(rv, int) else 0
    except typer.Exit as e:
        if e.exit_code == 130:  # Typer turns Ctrl-C inside a command into Exit(130)
            typer.echo("Interrupted.", err=True)
        return e.exit_code
    except _click_errors() as e:  # usage errors: Click's own message, exit 2
        e.show()
        return e.exit_code
    except typer.Abort:
        typer.echo("Interrupted.", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("Interrupted.", err=True)
        return 130
    except GemmaExportError as e:
        if debug:
            raise
        typer.echo(f"Error: {e}", err=True)
        return e.exit_code
    except MemoryError:
        if debug:
            raise
        typer.echo("Error: out of memory", err=True)
        return 1


def _click_errors() -> tuple[type[Exception], ...]:
    """Click's usage-error base. Typer >= 0.2x vendors Click and raises its own copy (public
    base: typer.TyperException); older Typer raises click.ClickException."""
    errors: list[type[Exception]] = [typer.TyperException] if hasattr(typer, "TyperException") else []
    try:
        import click

        errors.append(click.ClickException)
    except ImportError:
        pass
    return tuple(errors)


def _console() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _console()
