"""The "vnm" torch.compile backend end to end on a small model: options, registration, report,
the user's model left unchanged, recompiles under changing shapes, gradients, inductor."""

import copy
import logging

import pytest
import torch
from torch import nn

import vnm_compile
from vnm_compile import VNMConfig, get_sparsity, sparsify_
from vnm_compile.backend import CompileReport, clear_reports, last_report, register, reports, vnm_backend
from vnm_compile.kernels.vnm_linear import OP


@pytest.fixture(autouse=True)
def _reference_op_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU op -> plain PyTorch reference
    torch._dynamo.reset()
    clear_reports()


class Block(nn.Module):
    def __init__(self, d=64, f=144):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)
        self.out = nn.Linear(d, 24)

    def forward(self, x):
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))
        return self.out(x)


def eager_abs(model, pattern, **cfg):
    ref = copy.deepcopy(model)
    sparsify_(ref, VNMConfig(pattern, score="abs", permute=False, **cfg), progress=False)
    return ref


def count_vnm(gm):
    return sum(n.target is OP for n in gm.graph.nodes)


def compile_fast(model, **options):
    return torch.compile(
        model, backend="vnm", options={"inductor": False, "force_sparse": True, **options}, fullgraph=True
    )


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"patern": "2:4"}, ValueError, r"unknown vnm backend option\(s\) \['patern'\]"),
        ({"pattern": "3:4:5:6"}, ValueError, "not of the form"),
        ({"pattern": "64:2:3"}, ValueError, "m must be >= 4"),
        ({"pattern": "2:4", "score": "magnitude"}, ValueError, "'score' must be one of"),
        ({"pattern": "2:4", "score": "ria"}, ValueError, "needs 'calibration'"),
        ({"pattern": "2:4", "score": "wanda", "calibration": torch.randn(2, 64)}, TypeError, "list of batches"),
        ({"pattern": "2:4", "score": "wanda", "calibration": []}, ValueError, "empty list"),
        ({"ignore": "fc1"}, TypeError, "'ignore' must be a list"),
        ({"min_numel": -1}, ValueError, "'min_numel' must be an int >= 0"),
        ({"strict": "yes"}, TypeError, "'strict' must be True or False"),
        ({"inductor": 1}, TypeError, "'inductor' must be True or False"),
        ({"dense_fallback": "no"}, TypeError, "'dense_fallback' must be True or False"),
    ],
)
def test_bad_options_give_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        vnm_backend(torch.fx.symbolic_trace(Block()), [torch.randn(2, 64)], options=options)
    # through torch.compile the same message surfaces (wrapped by Dynamo), saying whose error it is
    with pytest.raises(Exception, match=match) as info:
        torch.compile(Block(), backend="vnm", options=options)(torch.randn(2, 64))
    assert "vnm_compile: a bad option of torch.compile(backend='vnm'), not a PyTorch bug" in str(info.value)


def test_registered_on_import_and_through_the_entry_point(monkeypatch):
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    assert registry.lookup_backend("vnm") is vnm_backend
    # The entry-point path: lookup_backend loads vnm_compile.backend (whose import calls register())
    # and then registers what it loaded; register() must defer instead of causing a duplicate.
    monkeypatch.delitem(registry._COMPILER_FNS, "vnm")
    ep = EntryPoint(name="vnm", value="vnm_compile.backend:vnm_backend", group="torch_dynamo_backends")
    monkeypatch.setitem(registry._BACKENDS, "vnm", ep)
    register()
    assert "vnm" not in registry._COMPILER_FNS
    assert registry.lookup_backend("vnm") is vnm_backend
    register()  # idempotent once registered


def test_compile_prunes_a_copy_matches_eager_sparsified_and_reports(caplog):
    torch.manual_seed(0)
    model = Block().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = eager_abs(model, "64:2:8", ignore=("out",), min_numel=0)
    compiled = compile_fast(model, pattern="64:2:8", score="abs", ignore=["out"], min_numel=0)
    x = torch.randn(3, 11, 64)
    with caplog.at_level(logging.INFO, logger="vnm_compile.backend"), torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, ref(x), rtol=1e-5, atol=1e-5)  # float32 reference op: rounding only
    # the user's model is untouched: weights, state, output
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(get_sparsity(m) is None for m in model.modules())
    # the report, from Python and in the log
    report = last_report()
    assert isinstance(report, CompileReport) and reports() == [report]
    assert [r.name for r in report.lowered] == ["fc1", "fc2"]
    assert all(str(r.pattern) == "64:2:8" and r.origin == "compile (abs)" for r in report.lowered)
    assert report["out"].reason == "ignored by name" and not report["out"].lowered
    # 2/8 of the values plus indices, rows padded 144 -> 192 for V = 64
    assert report["fc1"].sparse_bytes < report["fc1"].dense_bytes / 2
    assert "2 linears lowered to vnm::linear" in caplog.text and "1 left dense" in caplog.text
    assert "fc1" in report.table() and "ignored by name" in str(report)


def test_recorded_state_without_pattern_and_strict(monkeypatch):
    torch.manual_seed(1)
    model = Block().eval()
    sparsify_(model, VNMConfig("2:4", score="abs", permute=False, ignore=(), min_numel=2000), progress=False)
    compiled = compile_fast(model)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    report = last_report()
    assert {r.name: r.lowered for r in report.layers} == {"fc1": True, "fc2": True, "out": False}
    assert report["out"].reason == "no V:N:M state and no pattern option"
    # strict: a layer the dispatcher would leave dense is an error
    import vnm_compile.kernels as kernels
    from vnm_compile.kernels import dispatch

    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda *a: 0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strict=True.*fc1"):
        compile_fast(model, strict=True)(x)
    monkeypatch.setattr(kernels, "prefer_sparse", lambda *a: False)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="strict=True.*fc1"):
        compile_fast(model, strict=True, dense_fallback=False)(x)


def test_changing_shapes_do_not_recompile_per_size():
    torch.manual_seed(2)
    model = Block().eval()
    ref = eager_abs(model, "64:2:5", ignore=(), min_numel=0)
    compiled = compile_fast(model, pattern="64:2:5", min_numel=0, ignore=[])

    def run(sizes):
        with torch.no_grad():
            for batch, seq in sizes:
                x = torch.randn(batch, seq, 64)
                torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)

    # automatic dynamic: the first sizes static, then a graph dynamic in sequence (and batch) length
    run([(2, 5), (2, 9), (3, 17)])
    graphs = len(reports())
    assert graphs <= 3, [r.summary() for r in reports()]
    run([(2, 33), (4, 2), (2, 64), (5, 7), (3, 100), (6, 3)])  # six new sizes: no new graph
    assert len(reports()) == graphs
    assert all(len(r.lowered) == 3 for r in reports())


@pytest.mark.parametrize("limit", [None, 8])
def test_dynamic_graph_lowers_to_the_op_weight_bundle(limit, monkeypatch):
    """backend "vnm" with dynamic=True over two token counts: one graph, equal to eager, whose vnm ops
    take (x, [dense weights,] weight, spec, bias): the weight's tensors graph constants, the spec plain
    ints (a token limit of 8: hybrid_linear, 6 tokens sparse and 22 dense). The inductor tests trace the
    same ops through their fakes."""
    from vnm_compile.kernels import dispatch
    from vnm_compile.kernels.vnm_linear import HYBRID_OP
    from vnm_compile.passes.graph import op_args, op_weight

    if limit is not None:
        monkeypatch.setattr(dispatch, "sparse_token_limit", lambda *a, **k: limit)
    model = Block().eval()
    ref = eager_abs(model, "16:2:5", ignore=(), min_numel=0)
    graphs = []

    def vnm(gm, example_inputs):  # what backend="vnm" runs, keeping the lowered graph
        fn = vnm_backend(gm, example_inputs, options={"inductor": False, "force_sparse": True, "pattern": "16:2:5",
                                                      "min_numel": 0, "ignore": []})  # fmt: skip
        graphs.append(gm)
        return fn

    compiled = torch.compile(model, backend=vnm, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for seq in (3, 11):
            x = torch.randn(2, seq, 64)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.target in (OP, HYBRID_OP)]
    assert [n.target is HYBRID_OP for n in calls] == [limit is not None] * 3
    for node in calls:
        w, spec = op_weight(node), op_args(node)["spec"]
        assert all(type(s) is int for s in spec) and w.max_sparse_tokens == limit
        assert all(t.op == "get_attr" for t in op_args(node)["weight"])
        assert node.meta["example_value"].shape[-1] == w.out_features


def test_mark_dynamic_compiles_once():
    model = Block().eval()
    compiled = compile_fast(model, pattern="64:2:5", min_numel=0)
    with torch.no_grad():
        for seq in (7, 19, 3):
            x = torch.randn(2, seq, 64)
            torch._dynamo.mark_dynamic(x, 1)
            compiled(x)
    assert len(reports()) == 1


@pytest.mark.parametrize("inductor", [False])
def test_one_graph_serves_other_modules_and_updated_weights(inductor):
    """Dynamo reuses a graph for every instance of a class (parameters are inputs, not guarded by
    identity): the compressed weights baked into the graph must follow the weights it is called with."""
    torch.manual_seed(5)
    blocks = [Block().eval() for _ in range(3)]
    for b in blocks:
        b.compile(
            backend="vnm",
            options={"pattern": "64:2:8", "min_numel": 0, "ignore": [], "inductor": inductor, "force_sparse": True},
        )
    refs = [eager_abs(b, "64:2:8", ignore=(), min_numel=0) for b in blocks]
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        for b, r in zip(blocks, refs, strict=True):
            torch.testing.assert_close(b(x), r(x), rtol=1e-5, atol=1e-5)
        graphs = len(reports())
        for b, r in zip(blocks, refs, strict=True):  # second round: no more lowering
            torch.testing.assert_close(b(x), r(x), rtol=1e-5, atol=1e-5)
        assert len(reports()) == graphs
        # an in-place update (same Parameter object, new version) is lowered again
        blocks[0].fc1.weight.mul_(-2.0)
        ref = eager_abs(blocks[0], "64:2:8", ignore=(), min_numel=0)
        torch.testing.assert_close(blocks[0](x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(reports()) == graphs + 1


def test_gradients_flow_to_dense_neighbours():
    torch.manual_seed(3)
    model = Block()
    ref = eager_abs(model, "64:2:8", ignore=("out",), min_numel=0)
    compiled = compile_fast(model, pattern="64:2:8", ignore=["out"], min_numel=0)
    x = torch.randn(2, 6, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    compiled(x).square().sum().backward()
    ref(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.norm.weight.grad, ref.norm.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.fc1.bias.grad, ref.fc1.bias.grad, rtol=1e-5, atol=1e-5)
    assert model.fc1.weight.grad is None  # the compressed weight is a constant of the compiled graph


def test_inductor_end_to_end_on_a_tiny_model():
    """The one inductor (C++ codegen) test: slow on CPU, so one tiny model, one dynamic graph, no grad."""
    torch.manual_seed(4)
    model = Block(d=32, f=80).eval()
    ref = eager_abs(model, "16:2:8", ignore=(), min_numel=0)
    compiled = torch.compile(
        model, backend="vnm", options={"pattern": "16:2:8", "min_numel": 0, "ignore": [], "force_sparse": True}
    )
    with torch.no_grad():
        for seq in (5, 12):
            x = torch.randn(2, seq, 32)
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
        assert len(reports()) == 1 and len(reports()[0].lowered) == 3
        # new weight values: the graph is lowered and inductor-compiled again, still dynamic
        model.fc2.weight.mul_(0.5)
        ref = eager_abs(model, "16:2:8", ignore=(), min_numel=0)
        for seq in (4, 9):
            x = torch.randn(2, seq, 32)  # same guards: the weight check, not Dynamo, triggers it
            torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    assert len(reports()) == 2


def test_public_names():
    assert vnm_compile.backend.vnm_backend is vnm_backend


def test_a_restarted_compile_leaves_one_report():
    """Inductor makes Dynamo trace a dynamic BERT twice (its pass that turns Python float scalars into
    tensors restarts the analysis): the backend runs on both attempts, but only the graph Dynamo keeps
    gets a report."""
    transformers = pytest.importorskip("transformers")
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=128, num_hidden_layers=1, num_attention_heads=2, intermediate_size=256
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    torch._dynamo.reset()
    counters.clear()
    clear_reports()
    options = {"pattern": "64:2:8", "ignore": [], "min_numel": 0, "force_sparse": True}
    compiled = torch.compile(model, backend="vnm", options=options, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for length in (7, 33):
            ids = torch.randint(0, 100, (2, length))
            mask = torch.ones_like(ids)
            mask[1, length // 2 :] = 0
            torch.testing.assert_close(
                compiled(input_ids=ids, attention_mask=mask).last_hidden_state,
                model(input_ids=ids, attention_mask=mask).last_hidden_state,
                atol=0.5,  # pruned vs dense: only that both ran on these inputs
                rtol=0,
            )
    assert counters["stats"]["unique_graphs"] == 1
    assert len(reports()) == 1 and len(reports()[0].lowered) == 6


# --- issue 31: reliability -------------------------------------------------------------------------------


def test_weights_that_left_their_mask_are_refused_at_compile_time_naming_the_layers():
    torch.manual_seed(7)
    model = Block()
    sparsify_(model, VNMConfig("2:4", score="abs", permute=False, ignore=("out",), min_numel=0), progress=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).square().sum().backward()
    opt.step()  # a plain step: dense gradients put nonzeros outside the masks
    with pytest.raises(Exception, match=r"2 sparsified layer\(s\) have nonzero weights outside .*'fc1'.*'fc2'"):
        compile_fast(model)(torch.randn(2, 64))
    from vnm_compile.recovery import apply_masks_

    apply_masks_(model)  # the fix the message names
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(compile_fast(model)(torch.randn(2, 64) * 0 + 1), model(torch.ones(2, 64)))


def test_a_weight_edited_in_place_after_compiling_is_refused_at_the_next_call():
    torch.manual_seed(8)
    model = Block().eval()
    sparsify_(model, VNMConfig("2:4", score="abs", permute=False, ignore=("out",), min_numel=0), progress=False)
    compiled = compile_fast(model)
    x = torch.randn(2, 64)
    with torch.no_grad():
        compiled(x)
        model.fc2.weight.add_(0.01)  # every pruned position becomes nonzero
        with pytest.raises(ValueError, match=r"outside their recorded V:N:M mask: 'fc2'.*apply_masks_"):
            compiled(x)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(128, 64)
        self.body = nn.Linear(64, 64)
        self.lm_head = nn.Linear(64, 128, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(self.body(self.wte(ids)))


@pytest.mark.parametrize("ignore, reason", [(None, "ignored by name"), ([], "weight tied to the embedding 'wte'")])
def test_a_tied_lm_head_keeps_its_weight_with_the_pattern_option(ignore, reason):
    torch.manual_seed(9)
    model = TiedLM().eval()
    ids = torch.randint(0, 128, (2, 7))
    options = {"pattern": "16:2:8", "min_numel": 0} | ({} if ignore is None else {"ignore": ignore})
    with torch.no_grad():
        got = compile_fast(model, **options)(ids)
    report = last_report()
    assert report["lm_head"].reason.startswith(reason) and not report["lm_head"].lowered
    assert report["body"].lowered
    body = model.body.weight * vnm_compile.vnm_mask(model.body.weight.abs(), "16:2:8")
    with torch.no_grad():
        want = model.lm_head(nn.functional.linear(model.wte(ids), body, model.body.bias))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_are_reported_then_lowered_once_sparsified():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=32, vocab_size=101, use_cache=False)
    torch.manual_seed(10)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        torch.compile(model, backend="vnm", options={"pattern": "16:2:8", "inductor": False, "min_numel": 0})(ids)
    report = last_report()
    convs = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc"]
    for name in convs:
        assert report[name].reason.startswith("transformers Conv1D") and report[name].shape[1] == 64
    assert report["lm_head"].reason == "ignored by name"
    sparsify_(model, VNMConfig("16:2:8", score="abs", min_numel=0), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        got = compile_fast(model)(ids).logits
        want = model(ids).logits
    assert {r.name for r in last_report().lowered} >= set(convs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 0), (0, 8)])
def test_zero_size_layers_stay_dense_with_the_reason(shape):
    model = nn.Sequential(nn.Linear(*shape))
    x = torch.randn(2, shape[0])
    got = compile_fast(model, pattern="16:2:5", min_numel=0, strict=True)(x)
    assert got.shape == (2, shape[1])
    assert last_report()["0"].reason == f"zero-size weight {(shape[1], shape[0])}"
