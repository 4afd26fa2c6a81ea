"""export_onnx_streamed (a preset traced with fake tensors, each weight drawn and written
alone) against export_onnx (the model in memory, as traced before): the same graph, the
same tensors, the same logits; and per-tensor random weights equal to the in-memory ones."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from gemma_export.exporter.export import export_onnx, export_onnx_streamed
from gemma_export.models.load import PresetWeights, build_model, load_model, preset_config, random_weights


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma4-moe"])
def test_per_tensor_weights_equal_the_in_memory_ones(name):
    cfg = preset_config(name)
    whole = random_weights(cfg, seed=5)
    weights = PresetWeights(cfg, seed=5)
    for key in reversed(sorted(whole)):  # any order: each restarts the generator where it was
        assert torch.equal(weights.tensor(key), whole[key]), key


def test_a_preset_checkpoint_builds_no_model_until_asked():
    ckpt = load_model("gemma4-e2b")  # 4.6B parameters: building it here would take 18.6 GB
    assert ckpt.built is None and ckpt.weights is not None
    assert sum(int(np.prod(s)) for s in ckpt.weights.shapes.values()) > 4e9


def _initializers(path):
    proto = onnx.load(str(path))
    return proto, {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma4", "tiny-gemma4-moe"])
def test_streamed_export_is_the_in_memory_export(tmp_path, name):
    """Both ways (Gemma 3: the optimizer folds 1 + w on real values; Gemma 4: PLE, KV
    sharing; MoE: gathered experts; all: the tied head's Transpose that must not fold,
    MatMul weights that must): nodes byte-equal in order, I/O equal, every initializer
    equal by name (the order of the list differs: the folded weights are registered before
    the optimizer's own constants), and ONNX Runtime's logits bit-equal."""
    ckpt = load_model(name, seed=2)
    a, b = tmp_path / "memory", tmp_path / "streamed"
    a.mkdir(), b.mkdir()
    export_onnx(build_model(ckpt.config, random_weights(ckpt.config, 2), "ref"), a)
    export_onnx_streamed(ckpt.config, ckpt.weights, b)
    pa, ia = _initializers(a / "model.onnx")
    pb, ib = _initializers(b / "model.onnx")
    assert [n.SerializeToString() for n in pa.graph.node] == [n.SerializeToString() for n in pb.graph.node]
    assert pa.graph.input == pb.graph.input and pa.graph.output == pb.graph.output
    assert sorted(ia) == sorted(ib)
    for k in ia:
        assert ia[k].dtype == ib[k].dtype and np.array_equal(ia[k], ib[k]), k
    assert ckpt.built is None  # the streamed export never built the PyTorch model

    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, ckpt.config.vocab_size, (1, 12)),
             "attention_mask": np.ones((1, 12), np.int64), "position_ids": np.arange(12)[None]}
    sa = ort.InferenceSession(str(a / "model.onnx"), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(b / "model.onnx"), providers=["CPUExecutionProvider"])
    for i in sa.get_inputs():
        if i.name.startswith("past_key_values"):
            shape = [1, i.shape[1], 0, i.shape[3]]
            feeds[i.name] = np.zeros(shape, np.float32)
    la, lb = sa.run(["logits"], feeds)[0], sb.run(["logits"], feeds)[0]
    assert np.array_equal(la, lb)
