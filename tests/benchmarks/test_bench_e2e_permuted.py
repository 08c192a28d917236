"""bench_e2e.permuted_copy: the "permuted" variants' weights obey the pattern only inside their recorded random
permutations, and the compiled model matches the eager one (CPU, reference op path)."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_e2e  # noqa: E402

from vnm_compile import VNMPattern, is_vnm  # noqa: E402
from vnm_compile.state import get_sparsity  # noqa: E402


def test_permuted_copy_records_random_permutations(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the op's reference path: this checks the graph
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(192, 130), nn.ReLU(), nn.Linear(130, 192), nn.Linear(192, 8)).eval()
    sparse = bench_e2e.permuted_copy(model, "64:2:8")
    pattern = VNMPattern.parse("64:2:8")
    for i in (0, 2):
        state = get_sparsity(sparse[i])
        mask = sparse[i].weight != 0
        assert state is not None and torch.equal(mask, state.mask)
        assert not torch.equal(state.in_perm, torch.arange(state.in_perm.numel()))
        assert is_vnm(state.mask, pattern, state.in_perm, state.out_perm)
        assert not is_vnm(state.mask, pattern)  # scattered: not V:N:M in the original order
        rows, cols = state.mask.shape
        assert state.mask.sum() == rows * -(-cols // 8) * 2  # 2 per row and 8-column group (every group has 2 real)
    assert get_sparsity(sparse[3]) is None  # below min_numel: dense
    assert get_sparsity(model[0]) is None  # the original model is untouched
    x = torch.randn(3, 192)
    compiled = bench_e2e._compile(sparse, "64:2:8", smoke=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), sparse(x), rtol=1e-5, atol=1e-5)


def test_sparsified_random_permutations_with_and_without_output_permutations():
    """--permute random prunes through sparsify_ with random permutations; --no-output-permutations
    (VNMConfig(permute_outputs=False)) leaves every output permutation the identity and keeps the input ones."""
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    outs = {}
    for no_out in (False, True):
        args = SimpleNamespace(smoke=True, device="cpu", dtype=torch.float32, llama_layers=1, shapes="llama2-7b",
                               permute="random", joint_permutations=False, no_output_permutations=no_out,
                               sparsified={})  # fmt: skip
        sparse, info = bench_e2e.sparsified(args, "llama", bench_e2e.build_llama(args), "64:2:8")
        states = [get_sparsity(m) for m in sparse.modules() if isinstance(m, nn.Linear) and get_sparsity(m)]
        assert len(states) == 7 and info["permuted"] == 7
        assert all(s.in_perm is not None for s in states)
        outs[no_out] = [s.out_perm for s in states]
    assert all(p is not None for p in outs[False])
    assert all(p is None for p in outs[True])
