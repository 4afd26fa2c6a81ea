"""An ONNX Runtime session over an artifact: provider choice, IO binding, and a KV
cache that stays where the model runs. No torch.

    sess = DecoderSession(dir, provider="auto")
    cache = sess.new_cache(batch)
    logits, cache = sess.forward(input_ids, attention_mask, position_ids, cache)

The cache is a list of OrtValues living on the session's device. Each step binds the
previous step's `present.*` outputs as this step's `past_key_values.*` inputs, so on CUDA
the cache never makes a host round trip; only logits come back to the host. The same
code runs on CPU (device "cpu"), which is how CI covers the CUDA path's logic.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from gemma_export.errors import ArtifactError, RuntimeConfigError
from gemma_export.runtime.manifest import check_files, read_manifest

KEEP_INPUT = "num_logits_to_keep"  # exporter.export.KEEP_INPUT (the runtime does not import the exporter)
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class Provider(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


_ORT_NAMES = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider"}


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


class DecoderSession:
    """One artifact's decoder graph on one provider."""

    def __init__(
        self,
        artifact_dir: Path | str,
        provider: Provider | str = Provider.AUTO,
        threads: int | None = None,
        verify_checksums: bool = False,
    ):
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        # Sizes always (cheap, catches truncation); sha256 on request (reads every byte).
        check_files(self.dir, self.manifest, hashes=verify_checksums)
        self.config: dict[str, Any] = self.manifest["config"]
        self.num_layers = int(self.config["num_hidden_layers"])
        self.kv_heads = int(self.config["num_key_value_heads"])
        self.head_dim = int(self.config["head_dim"])
        self.vocab_size = int(self.config["vocab_size"])
        self.max_length = int(self.manifest.get("max_length") or self.config["max_position_embeddings"])
        self.eos_ids = tuple(self.config["eos_token_ids"])
        self.pad_id = int(self.config["pad_token_id"])
        io = self.manifest["io"]
        self.kv_dtype = _NP_DTYPES[io["inputs"]["past_key_values.0.key"]["dtype"]]
        # Artifacts from before num_logits_to_keep lack it; they get full logits.
        self.keeps_logits = KEEP_INPUT in io["inputs"]
        self.past_names = [f"past_key_values.{i}.{t}" for i in range(self.num_layers) for t in ("key", "value")]
        self.present_names = [f"present.{i}.{t}" for i in range(self.num_layers) for t in ("key", "value")]

        provider = _parse_provider(provider)
        if provider == Provider.CUDA and not cuda_available():
            raise RuntimeConfigError(
                "--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu, "
                "not onnxruntime, and make the CUDA libraries loadable)"
            )
        use_cuda = provider == Provider.CUDA or (provider == Provider.AUTO and cuda_available())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise RuntimeConfigError(f"--threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only; ORT warns about unused initializers etc.
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        # A graph per provider where the artifact has one (fp16/bf16: model.cpu.onnx).
        own = self.manifest.get("provider_model_files", {}).get("cuda" if use_cuda else "cpu")
        self.model_path = model_path = self.dir / (own or self.manifest["model_file"])
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidProtobuf / NoSuchFile types
            raise ArtifactError(f"{model_path}: ONNX Runtime cannot load it ({_one_line(e)})") from e
        took_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        if provider == Provider.CUDA and not took_cuda:
            raise RuntimeConfigError("--provider cuda: ONNX Runtime could not start the CUDA provider on this machine")
        self.provider = Provider.CUDA if took_cuda else Provider.CPU
        self.device = "cuda" if took_cuda else "cpu"

    # -- cache -------------------------------------------------------------------------------

    def new_cache(self, batch: int) -> list[ort.OrtValue]:
        """An empty cache (past length 0) on the session's device."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        return [self._to_device(empty) for _ in self.past_names]

    def _to_device(self, a: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

    # -- one step ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: list[ort.OrtValue],
        last_only: bool = False,
    ) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """Run the graph once: logits [B, S, V] on the host (with `last_only`, [B, 1, V]
        where the graph can skip the LM head elsewhere), the new cache on the device."""
        if last_only and self.keeps_logits:
            return self._forward_last(input_ids, attention_mask, position_ids, cache)
        binding = self.session.io_binding()
        for name, value in self._feeds(input_ids, attention_mask, position_ids, cache).items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", self.device)
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), list(outputs[1:])

    def _forward_last(self, input_ids, attention_mask, position_ids, cache):
        # IO binding cannot name an overridable initializer; run_with_ort_values can. Its
        # outputs come back on the host: one cache upload on CUDA per prefill, not per step.
        feeds = self._feeds(input_ids, attention_mask, position_ids, cache)
        feeds[KEEP_INPUT] = ort.OrtValue.ortvalue_from_numpy(np.array(1, np.int64))
        outputs = self.session.run_with_ort_values(["logits", *self.present_names], feeds)
        return outputs[0].numpy(), [self._on_device(v) for v in outputs[1:]]

    def _feeds(self, input_ids, attention_mask, position_ids, cache) -> dict[str, ort.OrtValue]:
        ints = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        feeds = {k: self._to_device(v.astype(np.int64, copy=False)) for k, v in ints.items()}
        return feeds | dict(zip(self.past_names, cache))

    def _on_device(self, v: ort.OrtValue) -> ort.OrtValue:
        return v if self.device == "cpu" else self._to_device(v.numpy())

    def cache_length(self, cache: list[ort.OrtValue]) -> int:
        return int(cache[0].shape()[2])


def _parse_provider(p: Provider | str) -> Provider:
    try:
        return Provider(p)
    except ValueError:
        raise RuntimeConfigError(f"unknown provider {p!r}; choose auto, cpu or cuda") from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def default_threads() -> int | None:
    """GEMMA_EXPORT_THREADS overrides ONNX Runtime's own choice (all physical cores)."""
    v = os.environ.get("GEMMA_EXPORT_THREADS")
    return int(v) if v else None
