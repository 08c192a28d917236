import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.passes import CompileContext, CompileOptions, find_linears
from vnm_compile.passes.find_linears import module_name_from_source


def test_finds_every_linear_with_its_parameter_and_name(h, toy):
    x = torch.randn(3, 5, 48)
    gm, inputs = h.capture(toy, x)
    code = gm.code
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[])
    assert code == gm.code  # annotation only
    names = [s.name for s in ctx.sites]
    assert names == ["up", "down", "shared", "head", "tiny"]
    modules = dict(toy.named_modules())
    for s in ctx.sites:
        assert s.weight is modules[s.name].weight  # the real Parameter, not a copy
        assert s.tokens == 15
    assert len(ctx.sites[names.index("shared")].nodes) == 2  # one site, two calls
    assert [s.name for s in ctx.to_lower()] == names


def test_decisions_and_reasons(h, toy):
    sparsify_(toy, VNMConfig("16:2:5", score="abs", permute=False, ignore=("head",), min_numel=1000), progress=False)
    gm, inputs = h.capture(toy, torch.randn(2, 48))
    # No pattern option: only recorded layers lower; ignore/min_numel apply as given.
    ctx = h.context(gm, inputs, ignore=["down"], min_numel=500)
    why = {s.name: s.dense_reason for s in ctx.sites}
    assert why["up"] is None and ctx.sites[0].origin == "recorded"
    assert why["down"] == "ignored by name"
    assert why["tiny"] == "no V:N:M state and no pattern option"  # the first reason that applies
    assert why["head"] == "no V:N:M state and no pattern option"
    assert why["shared"] is None  # 40 x 40 = 1600 >= 1000: sparsify_ recorded it
    why = {s.name: s.dense_reason for s in h.context(gm, inputs, pattern="2:4", min_numel=500).sites}
    assert why["tiny"] == "too small (320 < min_numel=500)"


def test_defaults_follow_vnmconfig_for_compile_time_pruning(h):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(96, 64)  # 6144 >= 4096
            self.lm_head = nn.Linear(64, 96)
            self.small = nn.Linear(64, 32)  # 2048 < 4096

        def forward(self, x):
            h = self.body(x)
            return self.lm_head(h) + self.small(h).sum(-1, keepdim=True)

    gm, inputs = h.capture(Net(), torch.randn(4, 96))
    why = {s.name: s.dense_reason for s in h.context(gm, inputs, pattern="2:4").sites}
    assert why == {"body": None, "lm_head": "ignored by name", "small": "too small (2048 < min_numel=4096)"}


def test_non_float_computed_and_float64_weights_stay_dense(h):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 64))
            self.f64 = nn.Linear(64, 64, dtype=torch.float64)
            self.ints = nn.Parameter(torch.randint(-3, 3, (64, 64)), requires_grad=False)

        def forward(self, x, k):
            a = F.linear(x, self.w * 2)  # weight computed in the graph
            b = self.f64(x.double()).float()
            c = F.linear(k, self.ints)
            return a + b, c

    gm, inputs = h.capture(Odd(), torch.randn(3, 64), torch.randint(-3, 3, (3, 64)))
    ctx = h.context(gm, inputs, pattern="2:4", min_numel=0)
    why = [s.dense_reason for s in ctx.sites]
    assert why[0] == "weight is computed in the graph, not a parameter"
    assert why[1].startswith("unsupported dtype torch.float64")
    assert why[2] == "non-float weight (torch.int64)"
    with pytest.raises(RuntimeError, match="strict=True.*would stay dense"):
        h.context(gm, inputs, pattern="2:4", min_numel=0, strict=True)


def test_dispatcher_preference_without_dense_fallback(h, toy, monkeypatch):
    """dense_fallback=False: the example's token count decides once per graph (prefer_sparse)."""
    import vnm_compile.kernels as kernels

    calls = []

    def prefer_sparse(out_features, in_features, pattern, tokens, device):
        calls.append((out_features, in_features, str(pattern), tokens, torch.device(device).type))
        return out_features != 40

    monkeypatch.setattr(kernels, "prefer_sparse", prefer_sparse)
    gm, inputs = h.capture(toy, torch.randn(7, 48))
    opts = dict(pattern="16:2:5", min_numel=0, ignore=[], dense_fallback=False)
    ctx = h.context(gm, inputs, **opts)
    assert (80, 48, "16:2:5", 7, "cpu") in calls
    why = {s.name: s.dense_reason for s in ctx.sites}
    assert why["up"] is None and why["tiny"] is None
    # a weight the pattern option would prune at compile time stays unpruned when kept dense
    assert why["down"] == "the kernel dispatcher prefers dense at 7 tokens on cpu; not pruned"
    assert all(s.max_sparse_tokens is None for s in ctx.sites)
    with pytest.raises(RuntimeError, match="dispatcher prefers dense"):
        h.context(gm, inputs, **opts, strict=True)
    # user choices are not errors under strict
    monkeypatch.setattr(kernels, "prefer_sparse", lambda *a: True)
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=1000, ignore=["head"], strict=True, dense_fallback=False)
    assert {s.name for s in ctx.to_lower()} == {"up", "down", "shared"}


@pytest.fixture
def limits(monkeypatch):
    """sparse_token_limit answered per output size (a dict filled by the test), recording its calls."""
    from vnm_compile.kernels import dispatch

    table: dict[int, int | None] = {}
    calls = []

    def sparse_token_limit(out_features, in_features, pattern, device):
        calls.append((out_features, in_features, str(pattern), torch.device(device).type))
        return table.get(out_features)

    monkeypatch.setattr(dispatch, "sparse_token_limit", sparse_token_limit)
    return table, calls


def test_token_limit_gives_sparse_dense_or_hybrid(h, toy, limits):
    table, calls = limits
    table.update({80: 0, 40: 16})  # up: never sparse; down/head/shared: sparse up to 16 tokens; tiny: no limit
    x = torch.randn(3, 5, 48)
    torch._dynamo.mark_dynamic(x, 1)
    gm, inputs = h.capture(toy, x)
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[])
    assert (80, 48, "16:2:5", "cpu") in calls and (8, 40, "16:2:5", "cpu") in calls
    by_name = {s.name: s for s in ctx.sites}
    assert by_name["up"].dense_reason == (
        "the kernel dispatcher prefers dense at every measured token count on cpu; not pruned"
    )
    assert {n: s.max_sparse_tokens for n, s in by_name.items() if s.dense_reason is None} == {
        "down": 16, "shared": 16, "head": 16, "tiny": None,
    }  # fmt: skip
    report = ctx.report()
    assert report["up"].mode == "dense" and report["tiny"].mode == "sparse"
    assert report["down"].mode == "hybrid (sparse up to 16 tokens)"
    assert "hybrid (sparse up to 16 tokens)" in report.table()
    assert "3 of them as vnm::hybrid_linear" in report.summary()
    with pytest.raises(RuntimeError, match="strict=True.*'up'.*every measured token count"):
        h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[], strict=True)


def test_static_token_counts_resolve_the_switch_at_compile_time(h, toy, limits):
    table, _ = limits
    table.update({80: 15, 40: 14})
    gm, inputs = h.capture(toy, torch.randn(3, 5, 48))  # 15 tokens, static
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[])
    why = {s.name: s.dense_reason for s in ctx.sites}
    assert why["up"] is None and ctx.sites[0].max_sparse_tokens is None  # 15 <= 15: plain vnm::linear
    assert why["down"] == "the kernel dispatcher prefers dense at 15 tokens on cpu (sparse up to 14); not pruned"
    # dense_fallback=False ignores the limit (and asks prefer_sparse, True off CUDA)
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[], dense_fallback=False)
    assert all(s.dense_reason is None and s.max_sparse_tokens is None for s in ctx.sites)


def test_get_attr_graphs_are_handled(toy):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(48, 64)

        def forward(self, x):
            return F.linear(x, self.proj.weight, self.proj.bias)

    model = Functional()
    gm = torch.fx.symbolic_trace(model)  # parameters as get_attr, not lifted inputs
    ctx = CompileContext(CompileOptions.from_dict({"pattern": "2:4", "min_numel": 0}), [torch.randn(2, 48)])
    assert find_linears(gm, ctx) is False
    (site,) = ctx.sites
    assert site.name == "proj" and site.weight is model.proj.weight and site.dense_reason is None


@pytest.mark.parametrize(
    "source, name",
    [
        ("L['self']._modules['layers']._modules['0']._parameters['weight']", "layers.0"),
        ("L['model']._modules['fc']._parameters['weight']", "fc"),
        ("L['self'].encoder.layer[3].attention.query.weight", "encoder.layer.3.attention.query"),
        # transformers 5: a decorator's wrapper calls forward(*args), the model is args[0]
        (
            "L['args'][0]._modules['model']._modules['layers']._modules['1']._modules['mlp']._modules['up_proj']"
            "._parameters['weight']",
            "model.layers.1.mlp.up_proj",
        ),
        ("L['kwargs']['model']._modules['fc']._parameters['weight']", "fc"),
    ],
)
def test_module_name_from_source(source, name):
    assert module_name_from_source(source) == name


def test_a_recorded_layer_kept_dense_stays_pruned(h, toy, limits):
    """sparsify_ masked the weight in place: kept dense, it still computes the pruned layer (no 'not pruned')."""
    table, _ = limits
    table.update({80: 0})
    sparsify_(toy, VNMConfig("16:2:5", score="abs", permute=False, ignore=(), min_numel=0), progress=False)
    gm, inputs = h.capture(toy, torch.randn(3, 48))
    ctx = h.context(gm, inputs, min_numel=0, ignore=[])
    why = {s.name: s.dense_reason for s in ctx.sites}
    assert why["up"] == "the kernel dispatcher prefers dense at every measured token count on cpu"
    assert ctx.sites[0].weight.count_nonzero() < ctx.sites[0].weight.numel()  # the weight the graph keeps is masked
