"""The names and behaviours ../shared/API.md promises, exercised end to end through the public API."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import vnm_compile
from vnm_compile import (
    VNMConfig,
    VNMPattern,
    VNMWeight,
    calibrate,
    find_permutation,
    importance,
    is_vnm,
    mask_diversity,
    select_pattern,
    sparsify_,
    vnm_mask,
)
from vnm_compile.kernels import vnm_linear


def test_all_names_exported():
    for name in vnm_compile.__all__:
        assert getattr(vnm_compile, name) is not None, name


def test_find_permutation_contract():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(96, 80, generator=g) ** 4
    p = VNMPattern(32, 2, 8)
    in_perm, out_perm = find_permutation(scores, p)
    assert in_perm.dtype == torch.int64 and out_perm.dtype == torch.int64
    assert torch.equal(in_perm.sort().values, torch.arange(80))
    assert torch.equal(out_perm.sort().values, torch.arange(96))
    permuted = scores[out_perm][:, in_perm]
    assert (permuted * vnm_mask(permuted, p)).sum() >= (scores * vnm_mask(scores, p)).sum()


def test_select_pattern_contract():
    speedups = {"64:2:5": 1.3, "64:2:8": 2.1, "32:2:8": 1.9, "128:2:6": 1.6}
    assert isinstance(select_pattern(speedups, 1.5), VNMPattern)
    with pytest.raises(ValueError):
        select_pattern(speedups, 10.0)
    assert mask_diversity(VNMPattern(64, 2, 5)) > 0


def test_pipeline_calibrate_sparsify_compress_kernel_compile(monkeypatch):
    # The reference path (interpreted Triton is covered by the kernel tests).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 192), nn.GELU(), nn.Linear(192, 128)).eval()
    batches = [torch.randn(4, 9, 128) for _ in range(3)]
    stats = calibrate(model, batches, progress=False)
    report = sparsify_(model, VNMConfig("64:2:5", score="ria", min_numel=0), stats, progress=False)
    assert len(report.sparsified) == 2
    first = model[0]
    state = vnm_compile.get_sparsity(first)
    assert is_vnm(state.mask, state.pattern, state.in_perm, state.out_perm)
    w = VNMWeight.from_dense(first.weight, state.mask, state.pattern, in_perm=state.in_perm, out_perm=state.out_perm)
    assert torch.equal(w.to_dense(), first.weight)
    x = torch.randn(3, 5, 128)
    assert torch.allclose(vnm_linear(x, w, first.bias), first(x), atol=1e-5)
    eager = model(x)
    compiled = torch.compile(model, backend="vnm", options={"inductor": False})
    assert torch.allclose(compiled(x), eager, atol=1e-5)


def test_backend_prunes_from_options_without_touching_the_model(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, 128)
    out = torch.compile(model, backend="vnm", options={"pattern": "64:2:8", "score": "abs", "inductor": False})(x)
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    masked = [m.weight * vnm_mask(m.weight.abs(), "64:2:8") for m in (model[0], model[2])]
    expected = nn.functional.linear(
        torch.relu(nn.functional.linear(x, masked[0], model[0].bias)), masked[1], model[2].bias
    )
    assert torch.allclose(out, expected, atol=1e-5)


def test_importance_contract():
    w = torch.randn(8, 16)
    for method in ("abs", "wanda", "ria"):
        s = importance(w, method, torch.rand(16))
        assert s.shape == w.shape


def test_backend_entry_point_without_import():
    from importlib.metadata import PackageNotFoundError, entry_points, version

    try:
        version("vnm_compile")
    except PackageNotFoundError:
        pytest.skip("vnm_compile is on the path but not installed (no entry points): pip install -e .")
    assert any(e.name == "vnm" for e in entry_points(group="torch_dynamo_backends"))
    code = textwrap.dedent(
        """
        import sys, torch
        m = torch.nn.Linear(64, 64)
        y = torch.compile(m, backend="vnm", options={"inductor": False})(torch.randn(2, 64))
        assert y.shape == (2, 64)
        print("vnm_compile" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("True")  # loaded through the entry point, not by the test
