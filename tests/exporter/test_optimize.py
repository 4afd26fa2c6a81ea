"""One test per rewrite rule: the fused op is present, the outputs are unchanged, and
the rule fired as often as the architecture says it must (counted from the config, not
from the code)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from gemma_export.exporter.optimize import RULES, apply_rule, optimize_graph
from gemma_export.exporter.rewrites import Graph
from gemma_export.runtime.manifest import sha256_file
from gemma_export.runtime.session import DecoderSession
from tests.conftest import TINY


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Each tiny preset exported without fusions (the portable graph)."""
    from gemma_export.exporter.pipeline import export_artifact

    root = tmp_path_factory.mktemp("plain")
    out = {}
    for name in TINY:
        export_artifact(name, root / name, verify=False, optimize=False)
        out[name] = root / name
    return out


def expected(cfg: dict) -> dict[str, int]:
    L = cfg["num_hidden_layers"]
    norms_per_layer = 4 if cfg["family"] >= 2 else 2
    qk = 2 if cfg["family"] == 3 else 0
    return {
        "rms_norm": L * (norms_per_layer + qk) + 1,  # + the final norm
        "skip_rms_norm": 2 * L,  # both residual adds of each layer feed a norm
        "gelu_tanh": L,
    }


def _with_graph(src, dst, proto):
    shutil.copytree(src, dst)
    onnx.save(proto, str(dst / "model.onnx"))
    m = json.loads((dst / "manifest.json").read_text())
    m["files"]["model.onnx"] = {"size": (dst / "model.onnx").stat().st_size, "sha256": sha256_file(dst / "model.onnx")}
    (dst / "manifest.json").write_text(json.dumps(m))
    return DecoderSession(dst, provider="cpu")


def _logits(sess):
    rng = np.random.default_rng(0)
    ids = np.array([[2] + rng.integers(4, sess.vocab_size, 20).tolist(),
                    [0] * 6 + [2] + rng.integers(4, sess.vocab_size, 14).tolist()])
    mask = (np.arange(21)[None] >= np.array([[0], [6]])).astype(np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, cache = sess.forward(ids, mask, pos, sess.new_cache(2))
    step, _ = sess.forward(np.array([[7], [8]]), np.concatenate([mask, [[1], [1]]], 1), pos[:, -1:] + 1, cache)
    return np.concatenate([logits.reshape(-1), step.reshape(-1)])


FUSED_OP = {"rms_norm": "SimplifiedLayerNormalization", "skip_rms_norm": "SkipSimplifiedLayerNormalization",
            "gelu_tanh": "FastGelu"}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("rule_index", range(len(RULES)), ids=[r.name for r in RULES])
def test_rule(plain, tmp_path, name, rule_index):
    src = plain[name]
    cfg = json.loads((src / "manifest.json").read_text())["config"]
    proto = onnx.load(str(src / "model.onnx"), load_external_data=False)
    g = Graph(proto)
    # rules before this one first (skip_rms_norm works on rms_norm's output)
    for r in RULES[:rule_index]:
        apply_rule(g, r)
    rule = RULES[rule_index]
    before = sum(n.op_type == FUSED_OP[rule.name] for n in proto.graph.node)
    fired, _ = apply_rule(g, rule)
    after = [n for n in proto.graph.node if n.op_type == FUSED_OP[rule.name]]
    assert fired == expected(cfg)[rule.name]
    assert len(after) - before == fired or rule.name == "skip_rms_norm"
    if rule.name == "skip_rms_norm":  # it replaces SimplifiedLayerNormalization nodes
        assert len(after) == fired
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    fused = _with_graph(src, tmp_path / "fused", proto)
    ref = _logits(DecoderSession(src, provider="cpu"))
    got = _logits(fused)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5


def test_rules_report_why_not(plain):
    """A rule that does not match says why (the check half of pattern/check/rewrite)."""
    proto = onnx.load(str(plain["tiny-gemma1"] / "model.onnx"), load_external_data=False)
    g = Graph(proto)
    rule = RULES[1]  # skip_rms_norm before any rms_norm fused: nothing to match
    fired, reasons = apply_rule(g, rule)
    assert fired == 0
    reason = rule.match(g, next(n for n in proto.graph.node if n.op_type == "Reciprocal"))
    assert isinstance(reason, str) and reason


def test_optimized_artifact_records_fusions(tiny_artifacts):
    out, _ = tiny_artifacts["tiny-gemma3"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["graph"]["fusions"] == expected(m["config"])
    assert "SkipSimplifiedLayerNormalization" in m["onnxruntime_ops"]


def test_plain_artifact_is_portable(plain):
    m = json.loads((plain["tiny-gemma2"] / "manifest.json").read_text())
    assert m["onnxruntime_ops"] == [] and m["graph"]["fusions"] == {}
    onnx.checker.check_model(str(plain["tiny-gemma2"] / "model.onnx"), full_check=True)  # standard ONNX only


def test_optimize_graph_is_idempotent(plain):
    proto = onnx.load(str(plain["tiny-gemma2"] / "model.onnx"), load_external_data=False)
    first = optimize_graph(proto).fusions
    assert optimize_graph(proto).fusions == {k: 0 for k in first}


@pytest.mark.parametrize("name", TINY)
def test_attention_rule_and_shared_cache(plain, tmp_path, name):
    """Every layer's attention becomes one GroupQueryAttention (the I/O contract unchanged);
    then the shared-cache pass makes the cache one buffer per tensor (past and present both
    `cache_capacity` long); a left-padded batch
    (windows of 8 crossed, Gemma 2's softcap, Gemma 3's QK-norm and two RoPE bases) gives
    the same logits at every real position as the traced graph, through prefill and decode,
    and across the runtime growing the buffers (a first capacity of 22 positions)."""
    from gemma_export.exporter.rewrites.attention import AttentionRule
    from gemma_export.exporter.rewrites.shared_cache import share_kv_cache
    from gemma_export.models.config import GemmaConfig

    src = plain[name]
    m = json.loads((src / "manifest.json").read_text())
    cfg = GemmaConfig.from_dict(m["config"])
    proto = onnx.load(str(src / "model.onnx"), load_external_data=False)
    g = Graph(proto)
    for r in RULES:
        apply_rule(g, r)
    fired, _ = apply_rule(g, AttentionRule(cfg))
    ops = [n.op_type for n in proto.graph.node]
    assert fired == cfg.num_hidden_layers == ops.count("GroupQueryAttention")
    assert "Softmax" not in ops and ops.count("RotaryEmbedding") == 2 * cfg.num_hidden_layers
    kv = [v for v in [*proto.graph.input, *proto.graph.output] if v.name.startswith(("past_key_values.", "present."))]
    assert len(kv) == 4 * cfg.num_hidden_layers
    assert "cache_capacity" not in {v.type.tensor_type.shape.dim[2].dim_param for v in kv}
    unfused = Graph(onnx.load(str(src / "model.onnx"), load_external_data=False))
    assert not share_kv_cache(unfused, cfg)  # no GroupQueryAttention: the concat contract stays
    assert share_kv_cache(g, cfg)
    assert {v.type.tensor_type.shape.dim[2].dim_param for v in kv} == {"cache_capacity"}
    known = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer} | {""}
    for n in proto.graph.node:  # topologically sorted, as ONNX requires
        assert set(n.input) <= known, (n.name, set(n.input) - known)
        known |= set(n.output)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    fused = _with_graph(src, tmp_path / "fused", proto)
    ref_sess = DecoderSession(src, provider="cpu")
    rng = np.random.default_rng(1)
    lens = [21, 13, 4]
    ids = np.zeros((3, 21), np.int64)
    mask = np.zeros((3, 21), np.int64)
    for b, n in enumerate(lens):
        ids[b, 21 - n:] = [2] + rng.integers(4, cfg.vocab_size, n - 1).tolist()
        mask[b, 21 - n:] = 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    assert fused.shared_cache and not ref_sess.shared_cache
    states = [(s, s.new_cache(3, capacity=22)) for s in (ref_sess, fused)]
    outs = [[], []]
    for _ in range(6):
        for k, (s, cache) in enumerate(states):
            logits, cache = s.forward(ids, mask, pos, cache)
            states[k] = (s, cache)
            outs[k].append(np.concatenate([logits[b, -min(n, logits.shape[1]):] for b, n in enumerate(lens)]))
        ids = rng.integers(4, cfg.vocab_size, (3, 1))
        mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
    ref, got = np.concatenate(outs[0]), np.concatenate(outs[1])
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("name", TINY)
def test_pack_projections_rule(plain, tmp_path, name):
    """q/k/v (one input) and gate/up (another) become one MatMulNBits each: 2 per layer,
    same logits, and dequantized_weights still reads every checkpoint weight back."""
    from gemma_export.exporter.pipeline import quantize_artifact
    from gemma_export.exporter.quantize import dequantized_weights
    from gemma_export.exporter.rewrites.pack_projections import PackProjectionsRule

    q = tmp_path / "int4"
    quantize_artifact(plain[name], q, precision="int4", verify=False, optimize=False)
    cfg = json.loads((q / "manifest.json").read_text())["config"]
    proto = onnx.load(str(q / "model.onnx"))
    before = dequantized_weights(proto)
    n_before = sum(n.op_type == "MatMulNBits" for n in proto.graph.node)
    fired, _ = apply_rule(Graph(proto), PackProjectionsRule())
    assert fired == 2 * cfg["num_hidden_layers"]
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == n_before - 3 * cfg["num_hidden_layers"]
    after = dequantized_weights(proto)
    assert after.keys() == before.keys()
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    proto.graph.ClearField("value_info")
    packed = tmp_path / "packed"
    shutil.copytree(q, packed)
    m = json.loads((packed / "manifest.json").read_text())
    (packed / m["data_file"]).unlink()
    onnx.save(proto, str(packed / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location=m["data_file"], size_threshold=1024)
    for f in ("model.onnx", m["data_file"]):
        m["files"][f] = {"size": (packed / f).stat().st_size, "sha256": sha256_file(packed / f)}
    (packed / "manifest.json").write_text(json.dumps(m))
    ref, got = _logits(DecoderSession(q, provider="cpu")), _logits(DecoderSession(packed, provider="cpu"))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5


def test_attention_op_caps_scores_before_the_bias():
    """The attention rule hands Gemma 2's softcap to GroupQueryAttention with the graph's
    additive mask as attention_bias; exact only if masked keys get weight 0 however low
    the visible scores are (softcap then mask, as Gemma 2 computes). Scores here sit near
    -softcap, where mask-then-softcap would give the masked key about a quarter of the
    weight. The cache is shared (past and present one buffer), as the runtime drives it."""
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h

    d, past, cap = 8, 3, 5.0  # GroupQueryAttention wants head_size % 8 == 0
    node = h.make_node("GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens_k", "total", "", "", "", "mask"],
                       ["y", "prk", "prv"], domain="com.microsoft", num_heads=1, kv_num_heads=1, scale=1.0, softcap=cap)
    shapes = {"q": [1, 1, d], "k": [1, 1, d], "v": [1, 1, d], "mask": [1, 1, 1, past + 1],
              "pk": [1, 1, past + 1, d], "pv": [1, 1, past + 1, d]}
    inputs = [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in shapes.items()]
    inputs += [h.make_tensor_value_info("seqlens_k", T.INT32, [1]), h.make_tensor_value_info("total", T.INT32, [])]
    graph = h.make_graph([node], "a", inputs, [h.make_tensor_value_info(n, T.FLOAT, None) for n in ("y", "prk", "prv")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q = np.full((1, 1, d), 5.0, np.float32)
    keys = np.stack([np.full(d, -1.0), np.full(d, -1.2), np.full(d, -0.9), np.full(d, -1.1)]).astype(np.float32)
    vals = np.arange(4 * d, dtype=np.float32).reshape(4, d) * 100
    mask = np.array([np.finfo(np.float32).min, 0, 0, 0], np.float32)  # the first (past) key is masked
    kbuf, vbuf = np.zeros((1, 1, past + 1, d), np.float32), np.zeros((1, 1, past + 1, d), np.float32)
    kbuf[0, 0, :past], vbuf[0, 0, :past] = keys[:past], vals[:past]
    kv = [ort.OrtValue.ortvalue_from_numpy(a) for a in (kbuf, vbuf)]
    b = sess.io_binding()
    feeds = {"q": q, "k": keys[None, 3:], "v": vals[None, 3:], "mask": mask.reshape(1, 1, 1, -1),
             "seqlens_k": np.array([past], np.int32), "total": np.array(past + 1, np.int32)}
    for n, a in feeds.items():
        b.bind_cpu_input(n, a)
    for (i, o), v in zip((("pk", "prk"), ("pv", "prv")), kv):
        b.bind_ortvalue_input(i, v)
        b.bind_ortvalue_output(o, v)
    b.bind_output("y", "cpu")
    sess.run_with_iobinding(b)
    y = b.get_outputs()[-1].numpy()
    np.testing.assert_array_equal(kv[0].numpy()[0, 0, past], keys[3])  # written in place
    scores = cap * np.tanh(keys @ q[0, 0] / cap) + mask  # -40 / -48 / -36 / -44 before capping
    w = np.exp(scores - scores.max())
    np.testing.assert_allclose(y[0, 0], (w / w.sum()) @ vals, rtol=1e-5)
