"""Calibration data for the recipes, taken from the fp32 graph itself.

    fp32_session(model_path, extra_outputs)     the fp32 graph with inner tensors exposed
    sample_with_moments(model_path, kv_names, names, ...)
                                                 text the model samples, plus sum x x^T of
                                                 each named tensor over every sampled token

The integer recipes' GPTQ pass needs the second moments of every product's input. They
come from text the model samples from its own distribution (temperature 1, seeded), never
from the evaluation text, which would let the recipe fit the metric that judges it. Each
sampled token runs once, through the KV cache, so collecting the moments costs one
generation: a causal model's activations at position t are the same whether the sequence
is run whole or a token at a time.
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
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  str(model_path.parent.resolve()))
    return ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def empty_past(sess, batch: int) -> dict[str, np.ndarray]:
    """past_key_values.* feeds of length 0: [batch, kv_heads, 0, head_dim]."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values"):
            shape = [batch if isinstance(d, str) and "batch" in d else 0 if isinstance(d, str) else d
                     for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    return feeds


def sample_with_moments(model_path: Path, present_names: list[str], names: list[str], *, bos_id: int,
                        sequences: int = 16, length: int = 128, seed: int = 0, progress=None,
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sample `sequences` x `length` tokens (starting at <bos>, temperature 1) from the fp32
    graph, and return them with {name: sum over sampled positions of x x^T} (float64
    [K, K]) for each named tensor [..., K]. `present_names` are the graph's present.*
    outputs, in the order of its past_key_values.* inputs."""
    sess = fp32_session(model_path, names)
    past_inputs = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    rng = np.random.default_rng(seed)
    ids = np.full((sequences, 1), bos_id, np.int64)
    tokens = [ids]
    past = empty_past(sess, sequences)
    moments = {name: 0.0 for name in names}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def flush() -> None:  # x x^T over a few hundred rows at a time: one GEMM, not one per step
        for name, xs in rows.items():
            if xs:
                x = np.concatenate(xs)
                moments[name] = moments[name] + (x.T @ x).astype(np.float64)
                xs.clear()

    fetch = ["logits"] + present_names + names
    for t in range(length):
        feeds = {"input_ids": ids, "attention_mask": np.ones((sequences, t + 1), np.int64),
                 "position_ids": np.full((sequences, 1), t, np.int64), **past}
        out = sess.run(fetch, feeds)
        past = dict(zip(past_inputs, out[1:1 + len(present_names)]))
        for name, x in zip(names, out[1 + len(present_names):]):
            rows[name].append(x.reshape(-1, x.shape[-1]))
        if (t + 1) % 16 == 0:
            flush()
        if t + 1 < length:
            ids = _sample(out[0][:, -1], rng)[:, None]
            tokens.append(ids)
        if progress is not None:
            progress.count("sampling calibration text", t + 1, length)
    flush()
    return np.concatenate(tokens, axis=1), moments


def _sample(logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits) (temperature 1)."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    u = rng.random((len(p), 1))
    return np.minimum((p.cumsum(-1) < u).sum(-1), p.shape[-1] - 1).astype(np.int64)
