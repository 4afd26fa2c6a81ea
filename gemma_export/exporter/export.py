"""PyTorch -> ONNX: one decoder graph with a KV cache, serving prefill and decode.

    export_onnx(model, dir)  ->  dir/model.onnx + dir/model.onnx.data (fp32 reference graph)

We trace with torch.onnx's dynamo exporter (torch.export underneath: no Python-level
control flow is baked in silently, and every dim we mark stays symbolic, past length 0
included). The graph uses plain ONNX ops at opset 18, which every ONNX Runtime since
1.14 and other ONNX consumers run, and which keeps sliding windows, soft-capping and
left padding exactly as models/gemma.py writes them. Fusions for ONNX Runtime
(SimplifiedLayerNormalization, RotaryEmbedding, GroupQueryAttention, ...) are rewrites
on top of this graph (exporter/optimize.py), never a different trace.

After tracing, four rewrites make the graph match the contract (gemma_export/contract.py):
  1. I/O dims get the contract's names (batch_size, sequence_length, ...).
  2. The tied LM head reads the one embedding initializer through Gemm(transB=1); the
     exporter emits MatMul(Transpose(W)), which ONNX Runtime would constant-fold into a
     second 262144-row copy at load time.
  3. Nodes and weights are named after the module they came from
     (/model/layers.3/self_attn/q_proj/MatMul), read from the exporter's name scopes.
  4. An optional input `num_logits_to_keep` (int64 scalar, default 0 = every position)
     slices the hidden states before the LM head, so a prefill that only needs the next
     token's logits skips the 262144-wide head on every other prompt position. It is an
     initializer that is also a graph input: consumers that do not know it never feed it
     and get the contract's full logits.

export_onnx_streamed(cfg, weights, dir) makes the same files for a model that does not fit
in memory (E2B's fp32 weights are 18.6 GB): the module is built with fake tensors, the
trace holds no weight, every weight initializer becomes a lazy tensor that reads its one
tensor from `weights` when the file is written, and the exporter's folding of a weight's
Transpose (MatMul weights stored [in, out]) is done lazily here, before its optimizer
would have materialised it. Peak memory is the graph plus about one tensor.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import torch
from onnx import TensorProto, helper

from gemma_export.contract import (
    DATA_FILE, EMBED_WEIGHT, KEEP_INPUT, MODEL_FILE, input_names, io_spec, kv_entries, output_names,
)
from gemma_export.errors import ExportError
from gemma_export.models.config import GemmaConfig
from gemma_export.models.gemma import GemmaForCausalLM

if TYPE_CHECKING:
    from gemma_export.models.load import PresetWeights

OPSET = 18

class _Traceable(torch.nn.Module):
    """Takes the cache as one list argument so torch.export sees a flat pytree."""

    def __init__(self, model: GemmaForCausalLM):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        return self.m(input_ids, attention_mask, position_ids, tuple(past_key_values))


@dataclass
class ExportResult:
    model_path: Path


def export_onnx(model: GemmaForCausalLM, out_dir: Path) -> ExportResult:
    """Trace `model` (fp32) into out_dir/model.onnx with weights in model.onnx.data."""
    cfg = model.config
    raw = Path(out_dir) / MODEL_FILE
    try:
        with _quiet():
            program = _trace(model, cfg, optimize=True)
            program.save(str(raw), external_data=True)
    except Exception as e:  # torch.export raises many types; all mean "could not trace"
        raise ExportError(f"tracing {cfg.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    del program
    return _finish_graph(raw, cfg)


def export_onnx_streamed(cfg: GemmaConfig, weights: PresetWeights, out_dir: Path) -> ExportResult:
    """export_onnx's files without the model in memory: `weights` gives each tensor
    (`shapes`, `tensor(name)`), read once, when the weights file is written."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gemma_export.models.load import model_class

    raw = Path(out_dir) / MODEL_FILE
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            module = model_class(cfg)(cfg)
        with _quiet():
            program = _trace(module, cfg, optimize=False)
    except Exception as e:  # as in export_onnx
        raise ExportError(f"tracing {cfg.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    _bind_lazy_weights(program.model, weights)
    _fold_weight_transposes(program.model, weights)
    with _quiet():
        program.optimize()  # what torch.onnx.export(optimize=True) runs, on lazy weights
        program.save(str(raw), external_data=True)  # one tensor drawn and written at a time
    del program
    return _finish_graph(raw, cfg)


def _trace(module: torch.nn.Module, cfg: GemmaConfig, *, optimize: bool):
    """torch.onnx's dynamo export of `module` with the contract's I/O names and every dim
    symbolic (an ONNXProgram)."""
    # Example sizes >= 2 so torch.export keeps every dim symbolic (it specialises 0 and 1),
    # and all different: equal sizes share one symbol. A window entry's past is shorter
    # than the mask's P (the contract lets it hold only its newest positions), so its
    # length is a symbol of its own rather than P.
    B, S, P, P_window = 2, 3, 5, 4
    past = [torch.zeros(B, e.kv_heads, P if e.keep is None else P_window, e.head_dim)
            for e in kv_entries(cfg, windows=True) for _ in (0, 1)]
    args = (
        torch.zeros((B, S), dtype=torch.long),
        torch.ones((B, P + S), dtype=torch.long),
        torch.arange(P, P + S).repeat(B, 1),
        past,
    )
    auto = torch.export.Dim.AUTO
    dynamic = {
        "input_ids": {0: auto, 1: auto},
        "attention_mask": {0: auto, 1: auto},
        "position_ids": {0: auto, 1: auto},
        "past_key_values": [{0: auto, 2: auto} for _ in past],
    }
    return torch.onnx.export(
        _Traceable(module).eval(),
        args,
        input_names=input_names(cfg),
        output_names=output_names(cfg),
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        external_data=True,
        optimize=optimize,
        verbose=False,
    )


def _finish_graph(raw: Path, cfg: GemmaConfig) -> ExportResult:
    """Rewrite the graph structure only; the weights stay where the exporter wrote them."""
    proto = onnx.load(str(raw), load_external_data=False)
    _rename_io_dims(proto, cfg)
    _tie_lm_head(proto, cfg)
    _name_nodes_and_weights(proto)
    _relocate_external_data(proto, raw.parent)
    onnx.save(proto, str(raw))
    return ExportResult(raw)


# -- lazy weights (export_onnx_streamed) ---------------------------------------------------


def _bind_lazy_weights(model, weights: PresetWeights) -> None:
    """Every initializer the fake module gave (named m.<checkpoint key>, a FakeTensor)
    becomes a lazy tensor drawing that key from `weights`; the rest (constants the trace
    lifted) are real already."""
    import onnx_ir as ir
    from torch._subclasses.fake_tensor import FakeTensor

    for name, value in model.graph.initializers.items():
        if not isinstance(getattr(value.const_value, "raw", None), FakeTensor):
            continue
        key = name[len("m."):] if name.startswith("m.") else None
        if key not in weights.shapes:
            raise ExportError(f"traced initializer {name} is not a weight of {weights.cfg.name}")
        value.const_value = ir.LazyTensor(_weight_fn(weights, key, None), dtype=ir.DataType.FLOAT,
                                          shape=ir.Shape(weights.shapes[key]), name=name)


def _weight_fn(weights: PresetWeights, key: str, perm: list[int] | None):
    import onnx_ir as ir

    def make():
        t = weights.tensor(key).numpy()
        return ir.Tensor(t if perm is None else t.transpose(perm).copy())

    return make


def _fold_weight_transposes(model, weights: PresetWeights) -> None:
    """Transpose(weight) -> a lazy transposed initializer, for exactly the transposes the
    exporter's optimizer folds on large inputs (onnxscript's constant folding always folds
    Transpose when the large input has no other consumer), under the name it gives
    (the Transpose's output). Done by the optimizer, each fold would hold its result in
    memory; the tied embedding (Gather and the LM head) has two consumers and stays."""
    import onnx_ir as ir
    from onnxscript.optimizer._constant_folding import DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT

    g = model.graph
    for node in list(g):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        lazy = src.const_value if src is not None and src.is_initializer() else None
        if not isinstance(lazy, ir.LazyTensor) or lazy.size <= DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT:
            continue  # small ones the optimizer folds itself, on real values
        if len(src.consumers()) != 1:
            continue
        key = src.name[len("m."):]
        perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
        perm = perm or list(reversed(range(len(lazy.shape))))
        out = node.outputs[0]
        shape = ir.Shape([lazy.shape[i] for i in perm])
        folded = ir.Value(name=out.name, type=ir.TensorType(ir.DataType.FLOAT), shape=shape,
                          const_value=ir.LazyTensor(_weight_fn(weights, key, perm),
                                                    dtype=ir.DataType.FLOAT, shape=shape, name=out.name))
        g.register_initializer(folded)
        ir.convenience.replace_nodes_and_values(g, node, [node], [], [out], [folded])  # as the optimizer does
        del g.initializers[src.name]


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and warnings of its own; ours is the progress bar."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


# -- graph rewrites ------------------------------------------------------------------------


def _set_dims(vi: onnx.ValueInfoProto, dims: list) -> None:
    shape = vi.type.tensor_type.shape
    assert len(shape.dim) == len(dims), (vi.name, len(shape.dim), dims)
    for d, want in zip(shape.dim, dims):
        if isinstance(want, str):
            d.Clear()
            d.dim_param = want
        else:
            assert d.dim_value == want, (vi.name, d, want)


def _rename_io_dims(proto: onnx.ModelProto, cfg: GemmaConfig) -> None:
    spec = io_spec(cfg)
    for vi in proto.graph.input:
        _set_dims(vi, spec["inputs"][vi.name]["shape"])
    for vi in proto.graph.output:
        _set_dims(vi, spec["outputs"][vi.name]["shape"])
    # Intermediate shapes carry the exporter's own symbols (s3, s70 + s81): drop them,
    # ONNX Runtime infers shapes itself and stale symbols only confuse readers.
    del proto.graph.value_info[:]


def _tie_lm_head(proto: onnx.ModelProto, cfg: GemmaConfig) -> None:
    """MatMul(h, Transpose(E))  ->  Reshape(Gemm(Reshape(h, [-1, H]), E, transB=1), [B, S, V])."""
    g = proto.graph
    embed = next((i.name for i in g.initializer if _is_embedding(i, cfg)), None)
    if embed is None:
        raise ExportError("exported graph has no embedding initializer")
    transposes = [n for n in g.node if n.op_type == "Transpose" and n.input[0] == embed]
    if len(transposes) != 1:
        raise ExportError(f"expected one transpose of the tied embedding, found {len(transposes)}")
    tr = transposes[0]
    users = [n for n in g.node if tr.output[0] in n.input]
    if len(users) != 1 or users[0].op_type != "MatMul":
        raise ExportError("the tied embedding transpose does not feed exactly one MatMul")
    mm = users[0]
    h_all, out = mm.input[0], mm.output[0]
    p = "/lm_head"
    h = f"{p}/h_kept"
    keep = [  # k = num_logits_to_keep; k' = min(k, S) if k > 0 else S; h[:, S-k':]
        helper.make_node("Reshape", [KEEP_INPUT, f"{p}/one"], [f"{p}/k"], name=f"{p}/keep/Reshape"),
        helper.make_node("Shape", [h_all], [f"{p}/seq"], name=f"{p}/keep/Shape", start=1, end=2),
        helper.make_node("Greater", [f"{p}/k", f"{p}/zero"], [f"{p}/k_pos"], name=f"{p}/keep/Greater"),
        helper.make_node("Min", [f"{p}/k", f"{p}/seq"], [f"{p}/k_min"], name=f"{p}/keep/Min"),
        helper.make_node("Where", [f"{p}/k_pos", f"{p}/k_min", f"{p}/seq"], [f"{p}/k_eff"], name=f"{p}/keep/Where"),
        helper.make_node("Sub", [f"{p}/seq", f"{p}/k_eff"], [f"{p}/start"], name=f"{p}/keep/Sub"),
        helper.make_node("Slice", [h_all, f"{p}/start", f"{p}/seq", f"{p}/one"], [h], name=f"{p}/keep/Slice"),
    ]
    new = keep + [
        helper.make_node("Shape", [h], [f"{p}/h_shape"], name=f"{p}/Shape", start=0, end=2),
        helper.make_node("Concat", [f"{p}/h_shape", f"{p}/vocab"], [f"{p}/out_shape"], name=f"{p}/Concat", axis=0),
        helper.make_node("Reshape", [h, f"{p}/flat_shape"], [f"{p}/h2d"], name=f"{p}/Reshape"),
        helper.make_node("Gemm", [f"{p}/h2d", embed], [f"{p}/logits2d"], name=f"{p}/Gemm", transB=1),
        helper.make_node("Reshape", [f"{p}/logits2d", f"{p}/out_shape"], [out], name=f"{p}/Reshape_1"),
    ]
    g.initializer.extend(
        [
            helper.make_tensor(f"{p}/vocab", TensorProto.INT64, [1], [cfg.vocab_size]),
            helper.make_tensor(f"{p}/flat_shape", TensorProto.INT64, [2], [-1, cfg.hidden_size]),
            helper.make_tensor(f"{p}/one", TensorProto.INT64, [1], [1]),
            helper.make_tensor(f"{p}/zero", TensorProto.INT64, [1], [0]),
            helper.make_tensor(KEEP_INPUT, TensorProto.INT64, [], [0]),  # the input's default
        ]
    )
    g.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, []))
    nodes = []
    for n in g.node:
        if n is mm:
            nodes.extend(new)  # h is computed before mm and `out` used after: order holds
        elif n is not tr:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    # The embedding initializer gets its checkpoint name.
    _rename_value(proto, embed, EMBED_WEIGHT)


def _is_embedding(init: onnx.TensorProto, cfg: GemmaConfig) -> bool:
    return list(init.dims) == [cfg.vocab_size, cfg.hidden_size]


def _rename_value(proto: onnx.ModelProto, old: str, new: str) -> None:
    if old == new:
        return
    g = proto.graph
    for i in g.initializer:
        if i.name == old:
            i.name = new
    for n in g.node:
        for k, x in enumerate(n.input):
            if x == old:
                n.input[k] = new


def _scope(node: onnx.NodeProto) -> str | None:
    """The innermost module path of a node, from the exporter's metadata, as
    'model.layers.3.self_attn.q_proj' (None for nodes outside any submodule)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            modules = [s for s in scopes[:-1] if s.startswith("m.")]
            return modules[-1][2:] if modules else None
    return None


def _scope_path(scope: str) -> str:
    """'model.layers.3.self_attn.q_proj' -> '/model/layers.3/self_attn/q_proj'."""
    parts, out = scope.split("."), []
    i = 0
    while i < len(parts):
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}.{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return "/" + "/".join(out)


def _name_nodes_and_weights(proto: onnx.ModelProto) -> None:
    g = proto.graph
    inits = {i.name for i in g.initializer}
    used: Counter[str] = Counter()
    renames: dict[str, str] = {}
    experts: dict[str, list[str]] = {}
    for n in g.node:
        if n.name.startswith("/lm_head"):
            continue
        scope = _scope(n)
        path = _scope_path(scope) if scope else ""
        base = f"{path}/{n.op_type}"
        name = base if used[base] == 0 else f"{base}_{used[base]}"
        used[base] += 1
        n.name = name
        # Weight matrices (stored [in, out] by the exporter) take the module's name.
        if n.op_type == "MatMul" and scope and n.input[1] in inits and n.input[1] not in renames:
            renames[n.input[1]] = f"{scope}.MatMul.weight"
        # Gathered tables (Gemma 4's PLE, the experts) keep their checkpoint names, without
        # the tracing wrapper's attribute (_Traceable.m).
        if n.op_type == "Gather" and n.input[0] in inits and n.input[0].startswith("m."):
            renames.setdefault(n.input[0], n.input[0][len("m."):])
        if n.op_type == "GatherND" and scope and scope.endswith(".experts") and n.input[0] in inits:
            experts.setdefault(scope, []).append(n.input[0])
        del n.metadata_props[:]  # stack traces of the tracing machine: noise in the artifact
    renames.update(_expert_names(g, experts))
    for old, new in renames.items():
        _rename_value(proto, old, new)


def _expert_names(g: onnx.GraphProto, experts: dict[str, list[str]]) -> dict[str, str]:
    """The MoE block's two tables (indexed by the router's picks, so traced as GatherND on a
    constant the exporter names val_N) by their checkpoint names: gate_up_proj [E, 2I, H] is
    the one whose last dim is the other's middle dim (down_proj [E, H, I])."""
    dims = {i.name: tuple(i.dims) for i in g.initializer}
    out = {}
    for scope, names in experts.items():
        if len(names) != 2:
            continue
        a, b = names
        if dims[b][1] == dims[a][2] and dims[a][1] == 2 * dims[b][2]:
            out[a], out[b] = f"{scope}.gate_up_proj", f"{scope}.down_proj"
        elif dims[a][1] == dims[b][2] and dims[b][1] == 2 * dims[a][2]:
            out[b], out[a] = f"{scope}.gate_up_proj", f"{scope}.down_proj"
    return out


def _relocate_external_data(proto: onnx.ModelProto, out_dir: Path) -> None:
    """The exporter names the data file after the model file; make sure every external
    reference is the relative DATA_FILE so the artifact loads from any directory."""
    for init in proto.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location" and entry.value != DATA_FILE:
                src = out_dir / entry.value
                if src.exists() and not (out_dir / DATA_FILE).exists():
                    src.rename(out_dir / DATA_FILE)
                entry.value = DATA_FILE
