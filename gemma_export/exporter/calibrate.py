"""Calibration data for the recipes, taken from the fp32 graph itself.

    fp32_session(model_path, extra_outputs)   the fp32 graph with inner tensors exposed
    sample_tokens(model_path, bos_id=...)     text the model samples (seeded)
    InputMoments(model_path, ids, groups)     sum x x^T of each product's input over that
                                              text, one group (layer) at a time
    channel_peaks(model_path, ids, tensors)   max |x| per channel of each product's input
    outlier_channels(peaks, block_size)       the channels that set their block's int8 scale
                                              far above the block's other channels

The integer recipes' GPTQ pass needs the second moments of every product's input. They
come from text the model samples from its own distribution (temperature 1, seeded), never
from the evaluation text, which would let the recipe fit the metric that judges it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def fp32_session(model_path: Path, extra_outputs: list[str] = ()):
    """An ONNX Runtime CPU session over the fp32 graph at `model_path` that also returns
    `extra_outputs`. The graph goes in as bytes; its weights are read from the source
    directory in place, which is never written to."""
    import onnxruntime as ort

    proto = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in proto.graph.output}
    for name in extra_outputs:
        if name not in known:
            proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # No prepacked copies of the weights: 640 MB less on the 270M (1.08 GB of fp32
    # weights), and sampling and moment runs measured as fast without them.
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(model_path.parent.resolve()))
    return ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def run_fed(sess, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """sess.run(names) with the feeds the graph takes (not every graph has position_ids,
    num_logits_to_keep or a cache). An optional input with a default (num_logits_to_keep)
    is an overridable initializer to ONNX Runtime, not among get_inputs(): dropping its
    feed would silently run the LM head over every position."""
    wanted = {i.name for i in (*sess.get_inputs(), *sess.get_overridable_initializers())}
    return sess.run(names, {k: v for k, v in feeds.items() if k in wanted})


def empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    """past_key_values.* feeds of length 0: [batch, kv_heads, 0, head_dim]."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            shape = [batch if isinstance(d, str) and "batch" in d else 0 if isinstance(d, str) else d
                     for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    return feeds


def sample_tokens(model_path: Path, *, bos_id: int, sequences: int = 16, length: int = 128, seed: int = 0,
                  progress=None) -> np.ndarray:
    """`sequences` x `length` tokens the fp32 graph samples from <bos> at temperature 1
    (seeded), one token at a time through its KV cache."""
    sess = fp32_session(model_path)
    outputs = [o.name for o in sess.get_outputs()]
    presents = [n for n in outputs if n.startswith("present.")]
    rng = np.random.default_rng(seed)
    ids = np.full((sequences, 1), bos_id, np.int64)
    tokens = [ids]
    past = empty_past(sess, sequences)
    for t in range(1, length):
        feeds = {"input_ids": ids, "attention_mask": np.ones((sequences, t), np.int64),
                 "position_ids": np.full((sequences, 1), t - 1, np.int64), **past}
        out = dict(zip(["logits", *presents], sess.run(["logits", *presents], feeds)))
        past = {"past_key_values." + n[len("present."):]: out[n] for n in presents}
        ids = _sample(out["logits"][:, -1], rng)[:, None]
        tokens.append(ids)
        if progress is not None:
            progress.count("sampling calibration text", t + 1, length)
    return np.concatenate(tokens, axis=1)


class InputMoments:
    """{tensor: sum over every calibration position of x x^T} (float64 [K, K]) for the
    tensors in `groups` ({tensor: group, e.g. its layer}), computed a group at a time.

    Asking for a tensor runs the fp32 graph over all of `ids` (whole sequences, `batch`
    rows per call, the LM head on the last position only) and keeps the moments of that
    tensor's group and of the groups after it, as many as fit in `budget` bytes (at least
    the one); asking for a tensor not held drops them all first. Consumers that walk the
    graph in order (quantize_graph) so run the graph once on a small model (the 270M's
    moments are 0.9 GB in all) and hold a few layers at a time on a large one (a 2B
    model's down_proj input alone is 9216^2 float64, 0.7 GB per layer).
    """

    def __init__(self, model_path: Path, ids: np.ndarray, groups: dict[str, str], batch: int = 4,
                 budget: int = 2**30):
        self.ids, self.groups, self.batch, self.budget = ids, groups, batch, budget
        self.sess = fp32_session(model_path, list(groups))
        self.widths: dict[str, int] = {}
        self.held: dict[str, np.ndarray] = {}

    def _width(self, name: str) -> int:
        """K of a tensor [..., K]: the first call measures every tensor on one token."""
        if not self.widths:
            names = list(self.groups)
            for n, x in zip(names, self._outputs(names, self.ids[:1, :1])):
                self.widths[n] = int(x.shape[-1])
        return self.widths[name]

    def __contains__(self, name: str) -> bool:
        return name in self.groups

    def get(self, name: str) -> np.ndarray | None:
        if name not in self.groups:
            return None
        if name not in self.held:
            self.held = {}  # free what was held first
            self.held = self._run(self._next_names(name))
        return self.held[name]

    def _next_names(self, name: str) -> list[str]:
        """`name`'s group and the whole groups after it that fit in the budget."""
        members: dict[str, list[str]] = {}  # group -> its tensors, groups in graph order
        for n, g in self.groups.items():
            members.setdefault(g, []).append(n)
        order = list(members)
        out, size = [], 0
        for g in order[order.index(self.groups[name]):]:
            cost = sum(8 * self._width(n) ** 2 for n in members[g])
            if out and size + cost > self.budget:
                break
            out, size = out + members[g], size + cost
        return out

    def _run(self, names: list[str]) -> dict[str, np.ndarray]:
        acc = {name: 0.0 for name in names}
        for b0 in range(0, len(self.ids), self.batch):
            for name, x in zip(names, self._outputs(names, self.ids[b0:b0 + self.batch])):
                x = x.reshape(-1, x.shape[-1])
                acc[name] = acc[name] + (x.T @ x).astype(np.float64)  # a few hundred rows per GEMM
        return acc

    def _outputs(self, names: list[str], ids: np.ndarray) -> list[np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                 "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy(),
                 "num_logits_to_keep": np.array(1, np.int64), **empty_past(self.sess, len(ids))}
        return run_fed(self.sess, names, feeds)


def channel_peaks(model_path: Path, ids: np.ndarray, tensors: list[str], batch: int = 4) -> dict[str, np.ndarray]:
    """{tensor: max |x| per channel [K]} over every position of `ids` (whole sequences
    through the fp32 graph, the LM head on the last position only)."""
    sess = fp32_session(model_path, tensors)
    peaks: dict[str, np.ndarray] = {}
    for b0 in range(0, len(ids), batch):
        x_ids = ids[b0:b0 + batch]
        feeds = {"input_ids": x_ids, "attention_mask": np.ones_like(x_ids),
                 "position_ids": np.broadcast_to(np.arange(x_ids.shape[1], dtype=np.int64), x_ids.shape).copy(),
                 "num_logits_to_keep": np.array(1, np.int64), **empty_past(sess, len(x_ids))}
        for name, x in zip(tensors, run_fed(sess, tensors, feeds)):
            m = np.abs(x.reshape(-1, x.shape[-1])).max(0)
            peaks[name] = m if name not in peaks else np.maximum(peaks[name], m)
    return peaks


def outlier_channels(peaks: np.ndarray, block_size: int, ratio: float) -> np.ndarray:
    """Channels whose peak is more than `ratio` times the median peak of their block of
    `block_size` channels (MatMulNBits' int8 activation blocks): the ones that coarsen
    their neighbours' rounding. Sorted channel indices."""
    k = peaks.size - peaks.size % block_size
    blocks = peaks[:k].reshape(-1, block_size)
    med = np.median(blocks, axis=1, keepdims=True)
    return np.flatnonzero((blocks > ratio * np.maximum(med, 1e-12)).reshape(-1))


def _sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits) (temperature 1)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((len(p), 1))
    return np.minimum((p.cumsum(-1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)
