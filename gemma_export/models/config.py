"""One frozen config for the Gemma 1, 2, 3 and 4 text decoders.

Built from a Hugging Face `config.json` (model_type gemma, gemma2, gemma3_text, gemma4_text,
or the text part of gemma3 / gemma4), from GGUF metadata, or from a preset. The layer pattern is data
(`layer_types`), never `layer_id % 2` in code. Field names follow the Hugging Face
config so that a reader of either recognises them.

References: google/gemma_pytorch gemma/config.py; transformers' Gemma{,2,3}Config and
Gemma4TextConfig (per-layer-type head dims, KV sharing, PLE, MoE).
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
    family: int  # 1, 2, 3 or 4: the Gemma generation (decides norm layout and defaults)
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
    # -- Gemma 4 (family 4; the defaults are Gemma 1-3, where none of this exists) ----------
    # GLOBAL layers have their own head shape (E2B: 512-wide heads against 256 on SLIDING).
    global_head_dim: int | None = None  # None: head_dim
    num_global_key_value_heads: int | None = None  # None: num_key_value_heads
    # GLOBAL layers rotate only this share of each head ("proportional" RoPE: the other
    # frequencies are 0, so those dims pass through); SLIDING layers rotate all of it.
    rope_global_partial_factor: float = 1.0
    # GLOBAL layers have no v_proj: values are k_proj's output (before k_norm and RoPE).
    attention_k_eq_v: bool = False
    # The last N layers compute no K/V: each reads the cache of the last earlier layer of
    # its type (kv_source). The artifact has caches for the first L - N layers only.
    num_kv_shared_layers: int = 0
    # Per-layer input embeddings (PLE): a [vocab_per_layer, L * width] table gathered per
    # token, mixed with a projection of the main embedding and fed into every layer
    # (0: none).
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    use_double_wide_mlp: bool = False  # KV-shared layers' MLPs are 2 x intermediate_size wide
    # Mixture of experts beside the dense MLP in every layer (0: none): a router picks
    # top_k_experts of num_experts GeGLU experts of width moe_intermediate_size per token.
    num_experts: int = 0
    top_k_experts: int = 0
    moe_intermediate_size: int = 0
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
        if self.family != 4 and self._gemma4_fields_set():
            raise CheckpointError(f"config {self.name}: Gemma 4 fields on a Gemma {self.family} config")
        for i in range(self.num_hidden_layers):
            if self.num_attention_heads % self.kv_heads_for(i):
                raise CheckpointError(
                    f"config {self.name}: layer {i}: {self.num_attention_heads} heads is not a multiple "
                    f"of {self.kv_heads_for(i)} kv heads"
                )
        if not 0 <= self.num_kv_shared_layers < self.num_hidden_layers:
            raise CheckpointError(
                f"config {self.name}: num_kv_shared_layers {self.num_kv_shared_layers} must be in "
                f"[0, {self.num_hidden_layers})"
            )
        first = self.first_kv_shared_layer
        for i in range(first, self.num_hidden_layers):
            if self.layer_types[i] not in self.layer_types[:first]:
                raise CheckpointError(
                    f"config {self.name}: num_kv_shared_layers: layer {i} ({self.layer_types[i].value}) "
                    "has no earlier layer of its type to share K/V with"
                )
        if self.num_experts and not 0 < self.top_k_experts <= self.num_experts:
            raise CheckpointError(
                f"config {self.name}: top_k_experts {self.top_k_experts} must be in [1, {self.num_experts}]"
            )

    def _gemma4_fields_set(self) -> bool:
        return bool(self.global_head_dim or self.num_global_key_value_heads or self.attention_k_eq_v
                    or self.num_kv_shared_layers or self.hidden_size_per_layer_input or self.num_experts
                    or self.use_double_wide_mlp or self.rope_global_partial_factor != 1.0)

    # -- derived -------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return {1: "gemma", 2: "gemma2", 3: "gemma3_text", 4: "gemma4_text"}[self.family]

    @property
    def norm_offset(self) -> float:
        """RMSNorm scales by (offset + w): Gemma 1-3 store w around 0 (scale 1 + w),
        Gemma 4 stores the scale itself (offset 0)."""
        return 0.0 if self.family == 4 else 1.0

    def head_dim_for(self, layer: int) -> int:
        t = self.layer_types[layer]
        return self.global_head_dim if t == LayerType.GLOBAL and self.global_head_dim else self.head_dim

    def kv_heads_for(self, layer: int) -> int:
        t = self.layer_types[layer]
        g = self.num_global_key_value_heads
        return g if t == LayerType.GLOBAL and g else self.num_key_value_heads

    def has_v_proj(self, layer: int) -> bool:
        return not (self.attention_k_eq_v and self.layer_types[layer] == LayerType.GLOBAL)

    def mlp_width_for(self, layer: int) -> int:
        wide = self.use_double_wide_mlp and layer >= self.first_kv_shared_layer
        return self.intermediate_size * (2 if wide else 1)

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source(self, layer: int) -> int:
        """The layer whose keys and values `layer` attends over: itself, or for a KV-shared
        layer the last layer of its type before the shared ones (transformers' "store")."""
        first = self.first_kv_shared_layer
        if layer < first:
            return layer
        t = self.layer_types[layer]
        return max(j for j in range(first) if self.layer_types[j] == t)

    def cache_window(self, layer: int) -> int | None:
        """Positions a bounded cache of `layer` must keep (None: every position): a sliding
        layer's newest query sees itself and the `sliding_window - 1` keys before it, so
        older ones are never read again. Gemma 1-3 only: models/gemma.py masks a sliding
        layer by its own past's length; Gemma 4's graph (models/gemma4.py) reads every
        entry as full."""
        if self.family < 4 and self.layer_types[layer] == LayerType.SLIDING:
            return self.sliding_window - 1
        return None

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """The layers that own a cache entry (past_key_values.{i} for i in order)."""
        return tuple(range(self.first_kv_shared_layer))

    def rope_partial_for(self, layer_type: LayerType) -> float:
        return self.rope_global_partial_factor if layer_type == LayerType.GLOBAL else 1.0

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
        if self.family == 4:
            return self._to_hf_dict_gemma4()
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

    def _to_hf_dict_gemma4(self) -> dict[str, Any]:
        """transformers' Gemma4TextConfig fields (global_head_dim and
        num_global_key_value_heads are its constructor's spelling of per_layer_config)."""
        d: dict[str, Any] = {
            "architectures": ["Gemma4ForCausalLM"],
            "model_type": "gemma4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim or self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "final_logit_softcapping": self.final_logit_softcapping,
            "sliding_window": self.sliding_window or 512,
            "layer_types": [t.value for t in self.layer_types],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta},
                "full_attention": {"rope_type": "proportional", "rope_theta": self.rope_theta,
                                   "partial_rotary_factor": self.rope_global_partial_factor},
            },
            "attention_k_eq_v": self.attention_k_eq_v,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input or self.vocab_size,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "enable_moe_block": bool(self.num_experts),
            "num_experts": self.num_experts or None,
            "top_k_experts": self.top_k_experts or None,
            "moe_intermediate_size": self.moe_intermediate_size or None,
        }
        if self.num_global_key_value_heads:
            d["num_global_key_value_heads"] = self.num_global_key_value_heads
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "config.json") -> GemmaConfig:
        """Parse a Hugging Face config (older flat rope fields or transformers 5 `rope_parameters`)."""
        model_type = d.get("model_type")
        if model_type in ("gemma4", "gemma4_text"):
            return _gemma4_from_hf_dict(cls, d, name)
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


# Gemma4TextConfig fields this decoder cannot honour, and the value it can: refused by name.
_GEMMA4_REFUSED = {
    "use_bidirectional_attention": None,  # "all" / "vision": non-causal uses, not a decoder
    "attention_bias": False,
}
# per_layer_config overrides the decoder reads; any other key is refused by name.
_GEMMA4_PER_LAYER_KEYS = {"head_dim", "num_key_value_heads"}


def _gemma4_from_hf_dict(cls, d: dict[str, Any], name: str) -> GemmaConfig:
    """Gemma4TextConfig (model_type gemma4_text) or the text part of a multimodal gemma4
    config. The rules are transformers' configuration_gemma4.py: GLOBAL layers take
    global_head_dim / num_global_key_value_heads (the latter only with attention_k_eq_v),
    or what per_layer_config says for them once a config has been saved."""
    if d.get("model_type") == "gemma4":
        if "text_config" not in d:
            raise CheckpointError(f"{name}: model_type gemma4 without text_config")
        text = dict(d["text_config"])
        text["model_type"] = "gemma4_text"
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if key in d and key not in text:
                text[key] = d[key]
        return _gemma4_from_hf_dict(cls, text, name)
    for key, ok in _GEMMA4_REFUSED.items():
        if d.get(key, ok) != ok:
            raise CheckpointError(f"{name}: {key}={d[key]!r} is not supported (a causal text decoder needs {ok!r})")
    try:
        layers = int(d["num_hidden_layers"])
        heads = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or 256)
        kv_heads = int(d.get("num_key_value_heads") or heads)
        act = d.get("hidden_activation") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh"):
            raise CheckpointError(f"{name}: hidden_activation {act!r} is not Gemma's tanh GELU")
        if d.get("layer_types"):
            types = [LayerType(t) for t in d["layer_types"]]
        else:  # transformers' default: 5 sliding, 1 global
            types = [LayerType.SLIDING if (i + 1) % 6 else LayerType.GLOBAL for i in range(layers)]
        types[-1] = LayerType.GLOBAL  # transformers forces the last layer global
        k_eq_v = bool(d.get("attention_k_eq_v", False))
        global_dim = d.get("global_head_dim")
        global_kv = d.get("num_global_key_value_heads") if k_eq_v else None
        per_layer = d.get("per_layer_config")
        if per_layer:
            global_dim = global_kv = None
            for idx, over in per_layer.items():
                bad = set(over) - _GEMMA4_PER_LAYER_KEYS
                if bad:
                    raise CheckpointError(f"{name}: per_layer_config[{idx}].{sorted(bad)[0]} is not supported")
                i = int(idx)
                if types[i] != LayerType.GLOBAL:
                    raise CheckpointError(f"{name}: per_layer_config[{idx}] overrides a sliding layer")
                dim, kv = over.get("head_dim", head_dim), over.get("num_key_value_heads", kv_heads)
                if global_dim not in (None, dim) or global_kv not in (None, kv):
                    raise CheckpointError(f"{name}: per_layer_config gives global layers different shapes")
                global_dim, global_kv = dim, kv
        elif global_dim is None:
            global_dim = 512  # Gemma4TextConfig's default
        params = d.get("rope_parameters") or {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
        }
        local, full = params.get("sliding_attention") or {}, params.get("full_attention") or {}
        for kind, p, ok in (("sliding_attention", local, ("default",)),
                            ("full_attention", full, ("default", "proportional"))):
            rt = p.get("rope_type", "default")
            if rt not in ok:
                raise CheckpointError(f"{name}: rope_parameters.{kind}.rope_type {rt!r} is not supported")
            if float(p.get("factor", 1.0)) != 1.0:
                raise CheckpointError(f"{name}: rope_parameters.{kind}.factor is not supported")
            if rt == "default" and float(p.get("partial_rotary_factor", 1.0)) != 1.0:
                raise CheckpointError(f"{name}: rope_parameters.{kind}.partial_rotary_factor is not supported")
        partial = float(full.get("partial_rotary_factor", 1.0)) if full.get("rope_type") == "proportional" else 1.0
        moe = bool(d.get("enable_moe_block", False))
        ple = int(d.get("hidden_size_per_layer_input") or 0)
        eos = d.get("eos_token_id", 1)
        window = d.get("sliding_window")
        return cls(
            family=4,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(full.get("rope_theta", 1_000_000.0)),
            rope_local_theta=float(local.get("rope_theta", 10_000.0)),
            query_pre_attn_scalar=1.0,  # Gemma 4 attention scaling is 1.0 (q and k are RMS-normed)
            final_logit_softcapping=_opt_float(d.get("final_logit_softcapping")),
            sliding_window=int(window) if window and LayerType.SLIDING in types else None,
            layer_types=tuple(types),
            sandwich_norms=True,
            qk_norm=True,
            max_position_embeddings=int(d.get("max_position_embeddings", 131_072)),
            bos_token_id=int(d.get("bos_token_id", 2)),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),),
            pad_token_id=int(d.get("pad_token_id") or 0),
            global_head_dim=int(global_dim) if global_dim and int(global_dim) != head_dim else None,
            num_global_key_value_heads=int(global_kv) if global_kv and int(global_kv) != kv_heads else None,
            rope_global_partial_factor=partial,
            attention_k_eq_v=k_eq_v,
            num_kv_shared_layers=int(d.get("num_kv_shared_layers") or 0),
            hidden_size_per_layer_input=ple,
            vocab_size_per_layer_input=int(d.get("vocab_size_per_layer_input") or 0) if ple else 0,
            use_double_wide_mlp=bool(d.get("use_double_wide_mlp", False)),
            num_experts=int(d["num_experts"]) if moe else 0,
            top_k_experts=int(d["top_k_experts"]) if moe else 0,
            moe_intermediate_size=int(d["moe_intermediate_size"]) if moe else 0,
            name=name,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: malformed Gemma 4 config ({type(e).__name__}: {e})") from e
