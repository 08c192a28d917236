"""The "vnm" backend's runtime dense fallback: layers whose measured table says sparse wins only up
to T tokens are lowered to vnm::hybrid_linear; one dynamic graph then runs sparse at <= T tokens and
dense above, without recompiling. The table is replaced by a monkeypatched sparse_token_limit."""

import copy
import importlib

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.backend import clear_reports, last_report, reports
from vnm_compile.kernels import dispatch

# the module (vnm_compile.kernels.vnm_linear is also the name of the function the package exports)
vnm_linear_module = importlib.import_module("vnm_compile.kernels.vnm_linear")
LIMIT = 8


class Block(nn.Module):
    def __init__(self, d=40, f=70):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d, bias=False)
        self.out = nn.Linear(d, 24)

    def forward(self, x):
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        return self.out(x)


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU op -> plain PyTorch reference
    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda out_features, *a: None if out_features == 24 else LIMIT)
    torch._dynamo.reset()
    clear_reports()


@pytest.fixture
def sparse_calls(monkeypatch):
    """How many times the sparse implementation ran (hybrid_linear's sparse branch or vnm::linear)."""
    calls = []
    impl = vnm_linear_module._sparse_linear

    def counting(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return impl(x, *args)

    monkeypatch.setattr(vnm_linear_module, "_sparse_linear", counting)
    return calls


def sparsified(pattern="16:2:5"):
    """A permuted model; the tests compile it with permutations="fold" (hybrid_linear: its dense branch reads
    the model's weights in original order; the "index" lowering is tested in tests/deploy)."""
    torch.manual_seed(0)
    model = Block().eval()
    sparsify_(model, VNMConfig(pattern, score="abs", permute=True, ignore=(), min_numel=0), progress=False)
    return model


def test_one_graph_runs_sparse_up_to_the_limit_and_dense_above(sparse_calls):
    model = sparsified()
    compiled = torch.compile(
        model,
        backend="vnm",
        options={"inductor": False, "force_sparse": True, "permutations": "fold"},
        fullgraph=True,
        dynamic=True,
    )
    # (batch, seq): 6 and 8 tokens <= LIMIT, 9, 14 and 33 above
    with torch.no_grad():
        for batch, seq in [(2, 3), (2, 4), (3, 3), (2, 7), (3, 11), (2, 3)]:
            x = torch.randn(batch, seq, 40)
            sparse_calls.clear()
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
            tokens = batch * seq
            # fc1 and fc2 switch at LIMIT; out has no limit (plain vnm::linear) and always runs sparse
            assert sparse_calls == ([tokens] * 3 if tokens <= LIMIT else [tokens]), (tokens, sparse_calls)
    assert len(reports()) == 1  # one graph for every token count: no recompile
    report = last_report()
    assert {r.name: r.mode for r in report.layers} == {
        "fc1": f"hybrid (sparse up to {LIMIT} tokens)",
        "fc2": f"hybrid (sparse up to {LIMIT} tokens)",
        "out": "sparse",
    }
    assert "2 of them as vnm::hybrid_linear" in report.summary()


def test_dense_branch_reads_the_models_weight_and_follows_updates(sparse_calls):
    model = sparsified("16:2:8")
    compiled = torch.compile(
        model, backend="vnm", options={"inductor": False, "force_sparse": True, "permutations": "fold"}, fullgraph=True
    )
    with torch.no_grad():
        for seq in (3, 13):
            x = torch.randn(2, seq, 40)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        # an in-place update of a masked weight: both branches follow it (the graph is lowered again)
        model.fc1.weight.mul_(-0.5)
        for seq in (3, 13):
            x = torch.randn(2, seq, 40)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(reports()) == 2 and all(len(r.lowered) == 3 for r in reports())


def test_compile_time_pruning_keeps_a_masked_copy_for_the_dense_branch():
    torch.manual_seed(1)
    model = Block().eval()
    before = copy.deepcopy(model.state_dict())
    ref = copy.deepcopy(model)
    sparsify_(ref, VNMConfig("16:2:5", score="abs", permute=False, ignore=(), min_numel=0), progress=False)
    options = {
        "pattern": "16:2:5",
        "min_numel": 0,
        "ignore": [],
        "inductor": False,
        "force_sparse": True,
        "permutations": "fold",
    }
    compiled = torch.compile(model, backend="vnm", options=options, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch, seq in [(2, 3), (3, 5)]:  # 6 tokens sparse, 15 dense
            x = torch.randn(batch, seq, 40)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert len(reports()) == 1 and last_report()["fc1"].mode == f"hybrid (sparse up to {LIMIT} tokens)"


@pytest.mark.parametrize("tokens", [(2, 3), (2, 9)])
def test_gradients_for_x_and_bias_on_both_branches(tokens):
    model = sparsified()
    model.train()
    compiled = torch.compile(
        model,
        backend="vnm",
        options={"inductor": False, "force_sparse": True, "permutations": "fold"},
        fullgraph=True,
        dynamic=True,
    )
    ref = copy.deepcopy(model)
    x = torch.randn(*tokens, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    compiled(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    assert last_report()["fc1"].mode.startswith("hybrid")
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.fc1.bias.grad, ref.fc1.bias.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.norm.weight.grad, ref.norm.weight.grad, rtol=1e-5, atol=1e-5)
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None  # frozen V:N:M weights


def test_dense_fallback_off_decides_once_per_graph(sparse_calls):
    model = sparsified()
    options = {"inductor": False, "dense_fallback": False, "force_sparse": True, "permutations": "fold"}
    compiled = torch.compile(model, backend="vnm", options=options, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch, seq in [(2, 3), (3, 11)]:
            x = torch.randn(batch, seq, 40)
            sparse_calls.clear()
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
            assert len(sparse_calls) == 3  # prefer_sparse (True off CUDA): vnm::linear at every size
    assert [r.mode for r in last_report().layers] == ["sparse"] * 3


def test_inductor_keeps_the_switch_at_run_time(sparse_calls):
    model = sparsified("16:2:8")
    compiled = torch.compile(model, backend="vnm", options={"force_sparse": True, "permutations": "fold"})
    with torch.no_grad():
        for seq in (3, 9):  # 6 tokens sparse, 18 dense
            x = torch.randn(2, seq, 40)
            torch._dynamo.mark_dynamic(x, 1)
            sparse_calls.clear()
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
            assert len(sparse_calls) == (3 if seq == 3 else 1)
    assert len(reports()) == 1
