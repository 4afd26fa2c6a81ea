"""`gemma-export serve`: load an artifact, build the app, run uvicorn until SIGTERM/SIGINT.

Shutdown: the first signal stops admission (new requests get 503) and lets in-flight
requests finish for `grace` seconds, after which the engine cancels what is left; then
uvicorn closes the connections and the process exits 0 (uvicorn's own habit of re-raising
the signal after a clean shutdown would make the exit status -15).
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from gemma_export.errors import GemmaExportError

log = logging.getLogger("gemma_export.server")


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"  # loopback unless asked: the API has no per-user limits
    port: int = 8000
    provider: str = "auto"
    threads: int | None = None
    max_batch: int = 16  # rows decoded together
    max_queue: int = 64  # requests waiting beyond the batch; more get 429
    prefill_chunk: int = 256  # prompt tokens per prefill forward while others decode
    api_key: str | None = None
    served_model_name: str | None = None  # default: the artifact directory's name
    cors_origins: tuple[str, ...] = ()
    verify_checksums: bool = True  # sha256 of every artifact file before serving
    portable: bool = False
    log_prompts: bool = False
    grace: float = 10.0  # seconds in-flight requests get after SIGTERM


def loader(artifact_dir: Path, opts: ServeOptions):
    """The engine factory the app runs on its loading thread."""

    def load():
        from gemma_export.runtime.generate import load_generator
        from gemma_export.server.engine import Engine

        gen = load_generator(artifact_dir, provider=opts.provider, threads=opts.threads, portable=opts.portable,
                             verify_checksums=opts.verify_checksums)
        return Engine(gen.session, gen.tokenizer, max_batch=opts.max_batch, max_queue=opts.max_queue,
                      prefill_chunk=opts.prefill_chunk)

    return load


def serve(artifact_dir: Path | str, opts: ServeOptions) -> None:
    """Serve until a signal; raises the load error (a GemmaExportError) if the model fails to load."""
    from gemma_export.runtime.manifest import Manifest
    from gemma_export.server.http import Settings, create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    artifact_dir = Path(artifact_dir)
    Manifest.read(artifact_dir)  # a wrong path fails here, before the port is taken
    holder: dict = {}

    def on_load_error(e: BaseException) -> None:
        holder["error"] = e
        if "server" in holder:
            holder["server"].should_exit = True

    settings = Settings(model_name=opts.served_model_name or artifact_dir.resolve().name, api_key=opts.api_key,
                        cors_origins=opts.cors_origins, log_prompts=opts.log_prompts, on_load_error=on_load_error)
    app = create_app(loader(artifact_dir, opts), settings)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="info", access_log=opts.log_prompts,
                            timeout_graceful_shutdown=int(opts.grace) + 5, lifespan="on")
    server = _Server(config, lambda: app.state.server.engine, opts.grace)
    holder["server"] = server
    server.run()
    if "error" in holder:
        e = holder["error"]
        raise e if isinstance(e, GemmaExportError) else GemmaExportError(f"loading {artifact_dir} failed: {e}")


class _Server(uvicorn.Server):
    """uvicorn's server with a drain on the first signal and no re-raised signal."""

    def __init__(self, config, engine, grace):
        super().__init__(config)
        self._engine, self._grace = engine, grace

    def handle_exit(self, sig, frame) -> None:
        if sig == signal.SIGINT and self.should_exit:
            self.force_exit = True
            return
        eng = self._engine()
        if eng is not None:
            log.info("signal %d: no new requests; %.0f s for those in flight", sig, self._grace)
            eng.drain(self._grace)
        self.should_exit = True  # not recorded in _captured_signals: exit 0, not -sig
