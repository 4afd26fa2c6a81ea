"""One frozen config for the Gemma 1, 2 and 3 text decoders.

Built from a Hugging Face `config.json` (model_type gemma, gemma2, gemma3_text, or the
text part of gemma3), from GGUF metadata, or from a preset. The layer pattern is data
(`layer_types`), never `layer_id % 2` in code. Field names follow the Hugging Face
config so that a reader of either recognises them.

References: google/gemma_pytorch gemma/config.py; transformers' Gemma{,2,3}Config.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma_export.errors import CheckpointError


class LayerType(str, enum.Enum):
    SLIDING = "sliding_attention"  # attends to the last `sliding_window` positions
    GLOBAL = "full_attention"  # attends to every earlier position


@dataclass(frozen=True)
class GemmaConfig:
    family: int  # 1, 2 or 3: the Gemma generation (decides norm layout and defaults)
    vocab_size: int  # 256000 (Gemma 1/2) or 262144 (Gemma 3)
    hidden_size: int  # residual stream width
    intermediate_size: int  # GeGLU inner width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # 1 = MQA, < heads = GQA, == heads = MHA
    head_dim: int  # not always hidden / heads (Gemma 1 7B: 3072 / 16 != 256)
    rms_norm_eps: float = 1e-6
    # RoPE. Global layers use rope_theta; sliding layers use rope_local_theta (Gemma 3:
    # 10k local, 1M global). rope_scaling_factor is the linear position scaling the larger
    # Gemma 3 sizes apply to global layers only (positions / factor).
    rope_theta: float = 10000.0
    rope_local_theta: float = 10000.0
    rope_scaling_factor: float = 1.0
    # Attention scale is query_pre_attn_scalar ** -0.5 (Gemma 1: head_dim).
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None  # Gemma 2: 50.0
    final_logit_softcapping: float | None = None  # Gemma 2: 30.0
    sliding_window: int | None = None  # window size of SLIDING layers
    layer_types: tuple[LayerType, ...] = ()
    # Gemma 2/3 wrap both blocks in pre and post norms ("sandwich"); Gemma 1 has only pre.
    sandwich_norms: bool = False
    qk_norm: bool = False  # Gemma 3 RMS-normalises q and k per head before RoPE
    max_position_embeddings: int = 8192
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1,)
    pad_token_id: int = 0
    # Where the config came from, for messages and the manifest ("preset:tiny-gemma3", ...).
    name: str = "gemma"

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_hidden_layers:
            raise CheckpointError(
                f"config {self.name}: {len(self.layer_types)} layer types for "
                f"{self.num_hidden_layers} layers"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config {self.name}: {self.num_attention_heads} heads is not a multiple of "
                f"{self.num_key_value_heads} kv heads"
            )
        if LayerType.SLIDING in self.layer_types and not self.sliding_window:
            raise CheckpointError(f"config {self.name}: sliding layers but no sliding_window")

    # -- derived -------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return {1: "gemma", 2: "gemma2", 3: "gemma3_text"}[self.family]

    def rope_theta_for(self, layer_type: LayerType) -> float:
        return self.rope_local_theta if layer_type == LayerType.SLIDING else self.rope_theta

    def rope_scale_for(self, layer_type: LayerType) -> float:
        return 1.0 if layer_type == LayerType.SLIDING else self.rope_scaling_factor

    def replace(self, **changes: Any) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_types"] = [t.value for t in self.layer_types]
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        d = dict(d)
        d["layer_types"] = tuple(LayerType(t) for t in d["layer_types"])
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
        return cls(**d)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face style config.json, for clients that read a model folder."""
        d: dict[str, Any] = {
            "architectures": [
                {1: "GemmaForCausalLM", 2: "Gemma2ForCausalLM", 3: "Gemma3ForCausalLM"}[self.family]
            ],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": True,
            "rope_theta": self.rope_theta,
            "attention_bias": False,
        }
        if self.family >= 2:
            d.update(
                # transformers' configs type it int (their loaders validate it; 256, 144, ...).
                query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar),
                attn_logit_softcapping=self.attn_logit_softcapping,
                final_logit_softcapping=self.final_logit_softcapping,
                sliding_window=self.sliding_window,
                layer_types=[t.value for t in self.layer_types],
            )
        if self.family == 3:
            d["rope_local_base_freq"] = self.rope_local_theta
            d["rope_scaling"] = (
                {"rope_type": "linear", "factor": self.rope_scaling_factor}
                if self.rope_scaling_factor != 1.0
                else None
            )
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "config.json") -> GemmaConfig:
        """Parse a Hugging Face config (older flat rope fields or transformers 5 `rope_parameters`)."""
        model_type = d.get("model_type")
        if model_type == "gemma3" and "text_config" in d:
            # The multimodal Gemma 3 checkpoint: the decoder is its text part.
            text = dict(d["text_config"])
            text.setdefault("model_type", "gemma3_text")
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if key in d and key not in text:
                    text[key] = d[key]
            return cls.from_hf_dict(text, name)
        family = {"gemma": 1, "gemma2": 2, "gemma3_text": 3, "gemma3": 3}.get(model_type or "")
        if family is None:
            raise CheckpointError(
                f"{name}: model_type {model_type!r} is not a Gemma text decoder "
                "(expected gemma, gemma2, gemma3_text or gemma3)"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            layers = int(d["num_hidden_layers"])
            head_dim = int(d.get("head_dim") or hidden // heads)
            kv_heads = int(d.get("num_key_value_heads") or heads)
            act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
            if act not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
                raise CheckpointError(f"{name}: activation {act!r} is not Gemma's tanh GELU")

            rope_theta = float(d.get("rope_theta") or 10000.0)
            rope_local = float(d.get("rope_local_base_freq") or 10000.0)
            scaling = d.get("rope_scaling") or {}
            params = d.get("rope_parameters") or {}
            if params and "full_attention" in params:  # transformers 5, per layer type
                full = params["full_attention"] or {}
                rope_theta = float(full.get("rope_theta", rope_theta))
                scaling = full
                local = params.get("sliding_attention") or {}
                rope_local = float(local.get("rope_theta", rope_local))
            elif params:  # transformers 5, one set for all layers
                rope_theta = float(params.get("rope_theta", rope_theta))
                scaling = params
                if family < 3:
                    rope_local = rope_theta
            if family < 3:
                rope_local = rope_theta
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in ("default", "linear"):
                raise CheckpointError(f"{name}: RoPE type {rope_type!r} is not supported")
            factor = float(scaling.get("factor", 1.0)) if rope_type == "linear" else 1.0

            window = d.get("sliding_window")
            if family == 1:
                types = (LayerType.GLOBAL,) * layers
                window = None
            elif d.get("layer_types"):
                types = tuple(LayerType(t) for t in d["layer_types"])
            else:
                pattern = 2 if family == 2 else int(
                    d.get("sliding_window_pattern") or d.get("_sliding_window_pattern") or 6)
                types = tuple(
                    LayerType.SLIDING if (i + 1) % pattern else LayerType.GLOBAL for i in range(layers)
                )
            eos = d.get("eos_token_id", 1)
            eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
            return cls(
                family=family,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                rope_local_theta=rope_local,
                rope_scaling_factor=factor,
                query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or head_dim),
                attn_logit_softcapping=_opt_float(d.get("attn_logit_softcapping")) if family == 2 else None,
                final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")) if family >= 2 else None,
                sliding_window=int(window) if window and LayerType.SLIDING in types else None,
                layer_types=types,
                sandwich_norms=family >= 2,
                qk_norm=family == 3,
                max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
                bos_token_id=int(d.get("bos_token_id", 2)),
                eos_token_ids=eos_ids,
                pad_token_id=int(d.get("pad_token_id") or 0),
                name=name,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{name}: malformed Gemma config ({type(e).__name__}: {e})") from e

    @classmethod
    def from_hf_file(cls, path: Path) -> GemmaConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot read config ({e})") from e
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: config is not a JSON object")
        return cls.from_hf_dict(d, str(path))


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _int_if_whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x
