"""fuse_siblings: sibling V:N:M linears on one input share one vnm.linear launch, computing exactly
what the separate launches compute (float32 reference path: only summation order may differ)."""

import functools

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, calibrate, sparsify_
from vnm_compile.backend import vnm_backend
from vnm_compile.kernels.vnm_linear import OP
from vnm_compile.passes.graph import op_args
from vnm_compile.passes.lower_linears import LAYER_META

TOL = {"rtol": 1e-5, "atol": 1e-5}


class Recorder:
    """The vnm backend, keeping each lowered graph; permutations folded into the compressed weights (these
    tests are about vnm::linear launches; "index" lowering has its own tests in tests/deploy)."""

    def __init__(self, **options):
        self.options = {"inductor": False, "force_sparse": True, "permutations": "fold", **options}
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from vnm_compile.backend import last_report

        fn = vnm_backend(gm, example_inputs, options=self.options)
        self.graphs.append(gm)
        self.report = last_report()
        return fn

    def op_nodes(self, graph=-1) -> list:
        """The vnm::linear launches of a compiled graph."""
        return [n for n in self.graphs[graph].graph.nodes if n.op == "call_function" and n.target is OP]

    def launches(self, graph=-1) -> list[tuple[str, ...]]:
        return [tuple(n.meta[LAYER_META].split("+")) for n in self.op_nodes(graph)]


def compile_llama(model, ids, **options):
    """(last hidden state, Recorder) of ``model`` compiled whole (fullgraph) with these backend options."""
    torch._dynamo.reset()
    rec = Recorder(**options)
    with torch.no_grad():
        out = torch.compile(model, backend=rec, fullgraph=True)(ids).last_hidden_state
    return out, rec


@functools.cache
def _llama():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=344,  # not a multiple of V = 16: padding rows inside the stacked weight
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=100,
    )
    model = LlamaModel(cfg).eval()
    batches = [torch.randint(0, 100, (2, 12)) for _ in range(3)]
    # RIA with channel permutations: q/k/v (and gate/up) share an input permutation and each has its
    # own output permutation, so the stacked weight stores permuted rows of three layers
    cfg_sp = VNMConfig("16:2:8", score="ria", permute=True, min_numel=0)
    sparsify_(model, cfg_sp, calibrate(model, batches, progress=False), progress=False)
    return model


def test_llama_siblings_share_one_launch_and_match_separate_launches():
    model = _llama()
    ids = torch.randint(0, 100, (3, 7))
    with torch.no_grad():
        eager = model(ids).last_hidden_state
        outs = {}
        for fuse in (True, False):
            torch._dynamo.reset()
            rec = Recorder(fuse_siblings=fuse)
            outs[fuse] = torch.compile(model, backend=rec, fullgraph=True)(ids).last_hidden_state
            outs[fuse, "rec"] = rec
    torch.testing.assert_close(outs[True], outs[False], **TOL)
    torch.testing.assert_close(outs[True], eager, **TOL)
    fused, separate = outs[True, "rec"], outs[False, "rec"]
    assert len(separate.launches()) == 14 and all(len(g) == 1 for g in separate.launches())
    for i in range(2):
        attn, mlp = f"layers.{i}.self_attn", f"layers.{i}.mlp"
        assert (f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj") in fused.launches()
        assert (f"{mlp}.gate_proj", f"{mlp}.up_proj") in fused.launches()
        assert (f"{attn}.o_proj",) in fused.launches() and (f"{mlp}.down_proj",) in fused.launches()
    assert len(fused.launches()) == 8
    report = fused.report
    assert report[f"{attn}.k_proj"].mode == "sparse, fused x3" and report[f"{mlp}.down_proj"].mode == "sparse"
    assert report[f"{attn}.k_proj"].permuted
    assert "10 of them in 4 fused launches" in report.summary()
    # the members' own compressed buffers are gone from the graph: the weights are held once
    names = [name for name, _ in fused.graphs[-1].named_buffers()]
    assert sum(name.endswith("_values") for name in names) == 8


def test_fused_weights_are_held_once_and_reused_by_a_recompile():
    from vnm_compile.passes.fold_permutations import _COMPRESSED

    model = _llama()
    torch._dynamo.reset()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for seq in (5, 9):  # dynamic=False: one graph per length
            compiled(torch.randint(0, 100, (1, seq)))
    assert len(rec.graphs) == 2

    def storages(gm):
        return {b.untyped_storage().data_ptr() for name, b in gm.named_buffers() if name.endswith("_values")}

    assert storages(rec.graphs[0]) == storages(rec.graphs[1])  # the second graph reuses the fused tensors
    q = model.layers[0].self_attn.q_proj.weight
    cached = _COMPRESSED[q][2].values  # the compression cache holds a view into the fused tensor
    assert cached.untyped_storage().data_ptr() in storages(rec.graphs[0])


class Siblings(nn.Module):
    """Five linears on one input; only c and d may share a launch."""

    def __init__(self) -> None:
        super().__init__()
        for name in "abcde":
            setattr(self, name, nn.Linear(64, 48))

    def forward(self, x):  # x: (2, 5, 64)
        a = self.a(x)  # a graph output: the caller would get a strided slice
        b = self.b(x).view(2, -1)  # merges tokens with features: illegal on a column slice
        c = self.c(x).view(2, 5, 4, 12)  # splits the features: fine on a slice
        d = torch.relu(self.d(x))
        e = self.e(x)
        e.mul_(2)  # in place
        return a, b, c.flatten(2) + d, e


def _siblings_sparse():
    torch.manual_seed(0)
    model = Siblings()
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=False, min_numel=0), progress=False)
    return model


def test_users_that_need_their_own_tensor_keep_separate_launches():
    model = _siblings_sparse()
    x = torch.randn(2, 5, 64)
    torch._dynamo.reset()
    rec = Recorder()
    got = torch.compile(model, backend=rec, fullgraph=True)(x)
    assert sorted(rec.launches()) == [("a",), ("b",), ("c", "d"), ("e",)]
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)
    assert rec.report["c"].fused_with == ("c", "d") and rec.report["a"].fused_with == ()


def test_gradients_through_a_fused_launch_match_separate_launches():
    """x and the concatenated biases stay differentiable (the biases are concatenated in the graph)."""
    grads = {}
    for fuse in (True, False):
        model = _siblings_sparse()
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch._dynamo.reset()
        rec = Recorder(fuse_siblings=fuse)
        out = torch.compile(model, backend=rec, fullgraph=True)(x)
        assert (("c", "d") in rec.launches()) == fuse
        sum((o.double() ** 2).sum() for o in out).backward()
        grads[fuse] = [x.grad, model.c.bias.grad, model.d.bias.grad]
    for a, b in zip(grads[True], grads[False], strict=True):
        assert a is not None
        torch.testing.assert_close(a, b, **TOL)


def test_fused_launch_under_the_triton_interpreter(monkeypatch):
    """The fused launch through the Triton kernels (CI runs them under TRITON_INTERPRET=1)."""
    from vnm_compile.kernels.vnm_triton import interpreter_ready

    if not interpreter_ready():
        pytest.skip("triton was imported without TRITON_INTERPRET=1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _siblings_sparse()
    x = torch.randn(2, 5, 64)
    torch._dynamo.reset()
    rec = Recorder()
    with torch.no_grad():
        got = torch.compile(model, backend=rec, fullgraph=True)(x)
        want = model.double()(x.double())
    assert ("c", "d") in rec.launches()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pruned", ["recorded", "at compile time"])
def test_hybrid_siblings_share_one_launch_in_a_dynamic_graph(monkeypatch, h, pruned):
    """vnm.hybrid_linear siblings (sparse up to 4 tokens, dense above) fuse too: one dynamic graph runs
    the stacked compressed weight at 3 tokens and one GEMM per member weight at 10, no recompile.
    The dense weights are the model's masked Parameters (recorded) or masked copies (compile-time ABS)."""
    from transformers import LlamaModel

    from vnm_compile.kernels import dispatch
    from vnm_compile.kernels.vnm_linear import HYBRID_OP

    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda *a: 4)
    model, ref, options = _llama(), _llama(), {}
    if pruned == "at compile time":
        torch.manual_seed(1)
        model = LlamaModel(_llama().config).eval()
        ref = h.abs_sparsified(model, "16:2:8")
        options = {"pattern": "16:2:8", "min_numel": 0}
    torch._dynamo.reset()
    rec = Recorder(**options)
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for seq in (3, 10, 2, 7):  # batch 1: 3 and 2 tokens sparse, 10 and 7 dense
            ids = torch.randint(0, 100, (1, seq))
            torch.testing.assert_close(compiled(ids).last_hidden_state, ref(ids).last_hidden_state, **TOL)
    assert len(rec.graphs) == 1
    nodes = [n for n in rec.graphs[0].graph.nodes if n.op == "call_function" and n.target is HYBRID_OP]
    assert len(nodes) == 8 and sum(len(op_args(n)["dense_weights"]) for n in nodes) == 14  # one per layer
    assert rec.report["layers.1.mlp.up_proj"].mode == "hybrid (sparse up to 4 tokens), fused x2"


class Shared(nn.Module):
    """a is called twice on x (one weight, two calls); b, c and d read x too, c with another pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(64, n) for n in (32, 48, 32, 16))

    def forward(self, x):
        return torch.relu(self.a(x)) + self.a(x).sin(), self.b(x).cos(), self.c(x).tanh(), self.d(x).exp()


def test_repeated_weights_and_other_patterns_keep_separate_launches():
    torch.manual_seed(0)
    model = Shared()
    sparsify_(model, VNMConfig("16:2:5", permute=False, score="abs", min_numel=0, ignore=("c",)), progress=False)
    sparsify_(
        model, VNMConfig("16:2:8", permute=False, score="abs", min_numel=0, ignore=("a", "b", "d")), progress=False
    )
    x = torch.randn(3, 64)
    torch._dynamo.reset()
    rec = Recorder()
    with torch.no_grad():
        got = torch.compile(model, backend=rec, fullgraph=True)(x)
        want = model(x)
    # a (a weight called twice) keeps its own launches: fusing one call would hold its weight twice;
    # c (16:2:8) cannot join b and d (16:2:5)
    assert sorted(rec.launches()) == [("a",), ("a",), ("b", "d"), ("c",)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


def test_fuse_siblings_option_is_validated():
    with pytest.raises(TypeError, match="fuse_siblings"):
        vnm_backend(None, [], options={"fuse_siblings": "yes"})
