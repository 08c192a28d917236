"""Compressed models on the GPU: the sparse-tensor-core layout, both paths of vnm::compressed_linear, moves
and checkpoints (skipped without CUDA)."""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, VNMPattern, VNMWeight, sparsify_, vnm_mask
from vnm_compile.deploy import VNMLinear, compress_, load_compressed, save_compressed
from vnm_compile.kernels import compressed as C

pytestmark = pytest.mark.gpu


def _layer(rows, cols, pattern, dtype, seed, layout="auto"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    in_perm = torch.randperm(cols, device="cuda", generator=g)
    out_perm = torch.randperm(rows, device="cuda", generator=g)
    p = VNMPattern.parse(pattern)
    mask_p = vnm_mask(w[out_perm][:, in_perm].float().abs(), p)
    bias = torch.randn(rows, device="cuda", generator=g).to(dtype)
    mod = VNMLinear.from_weight(VNMWeight.from_dense(w[out_perm][:, in_perm], mask_p, p), bias, in_perm=in_perm,
                                out_perm=out_perm, layout=layout)  # fmt: skip
    return mod


@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 2304), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("pattern", ["64:2:8", "64:2:5", "128:2:8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compressed_linear_both_paths_match_float64(shape, pattern, dtype):
    mod = _layer(*shape, pattern, dtype, seed=hash((shape, pattern)) % 1000)
    assert mod.layout == "tc"
    dense = mod.to_dense().double()
    for tokens in (1, 3, 16, 32, 33, 100, 2048):
        x = torch.randn(tokens, shape[1], device="cuda").to(dtype)
        want = torch.nn.functional.linear(x.double(), dense, mod.bias.double())
        ref_err = (torch.nn.functional.linear(x, mod.to_dense(), mod.bias).double() - want).abs().max().item()
        # twice cuBLAS's error at this precision, or the sparse-tensor-core kernels' own bound (1 % of the
        # output's largest value, tests/kernels/test_sparse_tc.py): their split-K partial sums round differently
        bound = max(2 * ref_err, 1e-2 * want.abs().max().item())
        xp = x.index_select(-1, mod.in_perm)
        for path in ("sparse", "dense"):
            if path == "dense" and tokens <= C.DECODE_TOKENS:
                continue
            fn = C._sparse if path == "sparse" else C._dense
            yp = fn(xp, mod._weight_tensors(), mod._spec, None)
            y = yp.index_select(-1, mod._out_inv) + mod.bias
            assert not y.isnan().any()
            err = (y.double() - want).abs().max().item()
            assert err <= bound, (tokens, path, err, ref_err)
        y = mod(x)
        assert (y.double() - want).abs().max().item() <= bound


def test_compress_on_the_gpu_moves_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2816), nn.SiLU(), nn.Linear(2816, 1024)).cuda().half()
    sparsify_(model, VNMConfig("64:2:8", score="abs", permute=True), progress=False)
    x = torch.randn(7, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = model(x)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    compress_(model, progress=False)
    assert {m.layout for m in model.modules() if isinstance(m, VNMLinear)} == {"tc"}
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert held < 0.31 * dense_bytes
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
        model.cpu()
        assert model[0].layout == "rows"
        torch.testing.assert_close(model(x.cpu()), y.cpu(), rtol=2e-2, atol=2e-2)
        model.cuda()
        assert model[0].layout == "tc"
        save_compressed(model, tmp_path)
        with torch.device("meta"):
            fresh = nn.Sequential(nn.Linear(1024, 2816), nn.SiLU(), nn.Linear(2816, 1024)).half()
        load_compressed(fresh, tmp_path, device="cuda")
        assert fresh[0].layout == "tc"
        assert torch.equal(fresh(x), model(x))
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fresh, backend="vnm")(x), torch.compile(model)(x))


@pytest.mark.parametrize("shape", [(1000, 2304), (4096, 4096), (4096, 11008)])
@pytest.mark.parametrize("pattern", ["64:2:5", "128:2:8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tc_compact_layout_both_paths_match_float64(shape, pattern, dtype):
    """layout="tc-compact" (records without the dense GEMM's rows, k-steps padded to one): the sparse
    kernels (compiled with REC=2304) and the dense rebuild against float64, as the "tc" layout's test."""
    mod = _layer(*shape, pattern, dtype, seed=7, layout="tc-compact")
    assert mod.layout == "tc-compact" and mod.tc_records.shape[-1] == 576
    dense = mod.to_dense().double()
    for tokens in (1, 7, 16, 32, 33, 2048):
        x = torch.randn(tokens, shape[1], device="cuda").to(dtype)
        want = torch.nn.functional.linear(x.double(), dense, mod.bias.double())
        ref_err = (torch.nn.functional.linear(x, mod.to_dense(), mod.bias).double() - want).abs().max().item()
        bound = max(2 * ref_err, 1e-2 * want.abs().max().item())
        xp = x.index_select(-1, mod.in_perm)
        for fn in (C._sparse, C._dense):
            if fn is C._dense and tokens <= C.DECODE_TOKENS:
                continue
            y = fn(xp, mod._weight_tensors(), mod._spec, None).index_select(-1, mod._out_inv) + mod.bias
            err = (y.double() - want).abs().max().item()
            assert not y.isnan().any() and err <= bound, (tokens, fn.__name__, err, ref_err)


def test_tc_compact_model_moves_checkpoints_and_compiles(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 2816), nn.SiLU(), nn.Linear(2816, 1024)).cuda().half()
    sparsify_(model, VNMConfig("64:2:5", score="abs", permute=True), progress=False)
    x = torch.randn(7, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        ref = model(x)
        compress_(model, layout="tc-compact", progress=False)
        assert {m.layout for m in model.modules() if isinstance(m, VNMLinear)} == {"tc-compact"}
        y = model(x)
        torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
        model.cpu()
        model.cuda()
        assert model[0].layout == "tc-compact"
        save_compressed(model, tmp_path)
        with torch.device("meta"):
            fresh = nn.Sequential(nn.Linear(1024, 2816), nn.SiLU(), nn.Linear(2816, 1024)).half()
        load_compressed(fresh, tmp_path, device="cuda", layout="tc-compact")
        assert fresh[0].layout == "tc-compact"
        assert torch.equal(fresh(x), model(x))
        long = torch.randn(300, 1024, device="cuda", dtype=torch.half)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fresh, backend="vnm")(long), model(long), rtol=2e-2, atol=2e-2)
