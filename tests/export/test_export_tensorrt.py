"""TensorRT export: error paths and ONNX preparation run everywhere; engine tests need TensorRT and a GPU.

TensorRT is not installed on the machines this project is developed on, so the
engine and torch-tensorrt tests have only ever been skipped there (see README).
Tolerances on the GPU (engine vs the same sparsified model in PyTorch):
float32 rtol = atol = 1e-3 (TensorRT may use TF32 for the dense layers);
float16 rtol = atol = 1e-2.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, sparsify_

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from onnx import helper, numpy_helper  # noqa: E402

from vnm_compile.export import DOMAIN, OP_TYPE, to_onnx  # noqa: E402
from vnm_compile.export.tensorrt import prepare_for_tensorrt  # noqa: E402
from vnm_compile.export.tensorrt_plugin import PLUGIN_ATTRIBUTES  # noqa: E402

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
HAS_TORCH_TRT = importlib.util.find_spec("torch_tensorrt") is not None
needs_trt = pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT >= 10.8")


def _mlp(permute: bool, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(67, 131), nn.GELU(), nn.Linear(131, 67, bias=False), nn.LayerNorm(67))
    sparsify_(model, VNMConfig("64:2:5", score="abs", permute=permute, min_numel=100), progress=False)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- everywhere


def test_missing_tensorrt_names_what_to_install(monkeypatch, tmp_path):
    from vnm_compile.export import to_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'tensorrt>=10.8'"):
        to_tensorrt(_mlp(False), torch.randn(2, 3, 67), tmp_path / "m.engine")
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_export_warns_that_it_is_experimental(monkeypatch, tmp_path):
    from vnm_compile.export import compile_with_torch_tensorrt, to_tensorrt
    from vnm_compile.export.tensorrt import ExperimentalWarning

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.warns(ExperimentalWarning, match="to_tensorrt is experimental"), pytest.raises(ImportError):
        to_tensorrt(_mlp(False), torch.randn(2, 3, 67), tmp_path / "m.engine")
    warns = pytest.warns(ExperimentalWarning, match="compile_with_torch_tensorrt is experimental")
    with warns, pytest.raises(ImportError):
        compile_with_torch_tensorrt(_mlp(False), torch.randn(2, 3, 67))


def test_missing_torch_tensorrt_names_what_to_install(monkeypatch):
    from vnm_compile.export import compile_with_torch_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    with pytest.raises(ImportError, match="tensorrt"):
        compile_with_torch_tensorrt(_mlp(False), torch.randn(2, 3, 67))


@pytest.mark.skipif(
    not HAS_TRT or torch.cuda.is_available(), reason="needs TensorRT installed on a machine without GPU"
)
def test_no_gpu_is_a_clear_error(tmp_path):
    from vnm_compile.export import to_tensorrt

    with pytest.raises(RuntimeError, match="CUDA GPU"):
        to_tensorrt(_mlp(False), torch.randn(2, 3, 67), tmp_path / "m.engine")


@pytest.mark.parametrize("permute", [False, True], ids=["plain", "permuted"])
def test_prepare_for_tensorrt_targets_the_plugin(tmp_path, permute):
    """The ONNX handed to TensorRT: no function (parser falls back to the plugin), tagged nodes,
    int32 columns, 1-element dummies flagged absent, and unchanged compressed tensors."""
    model = _mlp(permute)
    path = to_onnx(model, torch.randn(2, 3, 67), tmp_path / "m.onnx")
    original = onnx.load(str(path))
    prepared = prepare_for_tensorrt(original)
    assert any(f.name == OP_TYPE for f in original.functions)  # the input is not modified
    assert not any(f.domain == DOMAIN and f.name == OP_TYPE for f in prepared.functions)

    inits = {i.name: numpy_helper.to_array(i) for i in prepared.graph.initializer}
    before = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    nodes = [nd for nd in prepared.graph.node if nd.domain == DOMAIN and nd.op_type == OP_TYPE]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(nodes) == 2
    for node, linear in zip(nodes, linears, strict=True):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == b"vnm_compile"
        assert set(PLUGIN_ATTRIBUTES) <= set(attrs)  # every plugin attribute is on the node
        assert attrs["has_bias"] == int(linear.bias is not None)
        state = get_sparsity(linear)
        assert attrs["has_row_index"] == int(state.out_perm is not None)
        _, values, columns, meta, row_index, bias = node.input
        assert inits[columns].dtype == np.int32
        np.testing.assert_array_equal(inits[columns], before[columns].astype(np.int32))
        np.testing.assert_array_equal(inits[values], before[values])
        np.testing.assert_array_equal(inits[meta], before[meta])
        rows_p = inits[values].shape[0]
        for name, present, size in ((row_index, attrs["has_row_index"], rows_p), (bias, attrs["has_bias"], 131)):
            assert inits[name].shape == ((size,) if present else (1,))


# --------------------------------------------------------------------------- TensorRT + GPU


@needs_trt
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_engine_matches_pytorch(tmp_path, dtype):
    from vnm_compile.export import load_engine, to_tensorrt

    model = _mlp(True, dtype).cuda()
    example = torch.randn(2, 5, 67, dtype=dtype, device="cuda")
    engine_path = to_tensorrt(model, example, tmp_path / "m.engine", fp16=dtype == torch.float16)
    engine = load_engine(engine_path)
    context = engine.create_execution_context()
    x = torch.randn(3, 7, 67, dtype=dtype, device="cuda")
    y = torch.empty(3, 7, 67, dtype=dtype, device="cuda")
    in_name, out_name = engine.get_tensor_name(0), engine.get_tensor_name(1)
    context.set_input_shape(in_name, tuple(x.shape))
    context.set_tensor_address(in_name, x.data_ptr())
    context.set_tensor_address(out_name, y.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), rtol=tol, atol=tol)


@pytest.mark.skipif(not HAS_TORCH_TRT, reason="needs torch-tensorrt")
@pytest.mark.gpu
def test_torch_tensorrt_compile_matches_pytorch():
    from vnm_compile.export import compile_with_torch_tensorrt

    model = _mlp(True).cuda()
    x = torch.randn(3, 7, 67, device="cuda")
    compiled = compile_with_torch_tensorrt(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-3, atol=1e-3)


def test_plugin_signature_matches_the_onnx_node(monkeypatch):
    """Register the plugin against a stand-in tensorrt.plugin module (runs without TensorRT): the
    description's inputs/attributes must be the VNMLinear node's, which is how the ONNX parser maps them."""
    import inspect
    import types

    from vnm_compile.export.onnx_function import ATTRIBUTES, INPUTS
    from vnm_compile.export.tensorrt_plugin import PLUGIN_ID, register_plugin

    registered: dict[str, object] = {}

    def decorator(kind):
        def make(plugin_id):
            def wrap(fn):
                registered[kind] = (plugin_id, fn)
                return fn

            return wrap

        return make

    trtp = types.ModuleType("tensorrt.plugin")
    trtp.TensorDesc = type("TensorDesc", (), {})
    trtp.register, trtp.autotune, trtp.impl = decorator("register"), decorator("autotune"), decorator("impl")
    trtp.AutoTuneCombination = lambda spec: spec
    trtp.from_shape_expr = lambda shape, dtype: (shape, dtype)
    trt = types.ModuleType("tensorrt")
    trt.plugin, trt.__version__ = trtp, "10.8.0"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    register_plugin.cache_clear()
    try:
        assert register_plugin() == PLUGIN_ID
    finally:
        register_plugin.cache_clear()

    assert {pid for pid, _ in registered.values()} == {PLUGIN_ID}
    params = inspect.signature(registered["register"][1]).parameters
    tensors = [n for n, p in params.items() if p.annotation is trtp.TensorDesc]
    attrs = [n for n, p in params.items() if p.annotation is int]
    assert tensors == ["x", *INPUTS[1:]]  # the node's inputs, in order (X is x here)
    assert attrs == list(PLUGIN_ATTRIBUTES) and set(ATTRIBUTES) <= set(attrs)
    impl_params = list(inspect.signature(registered["impl"][1]).parameters)
    assert impl_params[:6] == tensors and impl_params[-2:] == ["outputs", "stream"]
    assert set(impl_params[6:-2]) <= set(attrs)
    combos = registered["autotune"][1](*([None] * 7))
    assert len(combos) == 1 and len(combos[0].split(",")) == 7  # 6 inputs + 1 output

    # Output description: x's leading axes, out_features last, x's dtype.
    x = types.SimpleNamespace(ndim=3, shape_expr=["B", "S", 67], dtype="half")
    shape, dtype = registered["register"][1](x, *([None] * 5), 64, 2, 5, 131, 67, 1, 0)
    assert shape == ("B", "S", 131) and dtype == "half"
