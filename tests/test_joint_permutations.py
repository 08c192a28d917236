"""Joint MLP permutations (VNMConfig.joint_permutations) end to end: the eager function is unchanged, the
compiled graph (cancel_permutations) and the compressed model (VNMLinear) run no index op between the
producers and the consumer, and both equal the eager sparsified model. (The same option links attention
v_proj -> o_proj, per head: tests/test_joint_attention.py; the counts here include those links.)

Tiny Llama (gated MLP), BERT and ViT (fc1 -> GELU -> fc2) from transformers configs with random weights.
Their inputs hold more than 32 tokens: at decode sizes the remaining output index ops go into the kernels'
store (store_out_permutations, tests/passes/test_pass_store_permutations.py).
"""

import copy
import re
import tempfile

import pytest
import torch

from vnm_compile import (
    VNMConfig,
    calibrate,
    compress_,
    decompress_,
    get_sparsity,
    load_compressed,
    save_compressed,
    sparsify_,
)
from vnm_compile.backend import vnm_backend
from vnm_compile.kernels.compressed import OP as COMPRESSED_OP
from vnm_compile.passes.lower_linears import LAYER_META, PERM_META
from vnm_compile.state import LinearSparsity, set_sparsity

transformers = pytest.importorskip("transformers")

PATTERN = "16:2:8"
INDEX_TARGETS = (torch.index_select, torch.ops.aten.index_select.default, torch.ops.aten.index.Tensor)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _llama(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    return model, [torch.randint(0, 96, (2, 11)) for _ in range(2)], torch.randint(0, 96, (3, 12))


def _bert(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()
    return model, [torch.randint(0, 96, (2, 11)) for _ in range(2)], torch.randint(0, 96, (3, 12))


def _vit(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=16, patch_size=4)  # fmt: skip
    model = transformers.ViTModel(cfg, add_pooling_layer=False).to(dtype).eval()
    return model, [torch.randn(2, 3, 16, 16, dtype=dtype) for _ in range(2)], torch.randn(3, 3, 16, 16, dtype=dtype)


MODELS = {"llama": _llama, "bert": _bert, "vit": _vit}


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _sparsified(kind: str, dtype=torch.float32, joint: bool = True):
    model, batches, x = MODELS[kind](dtype)
    stats = calibrate(model, batches, progress=False)
    report = sparsify_(model, VNMConfig(PATTERN, min_numel=0, joint_permutations=joint), stats, progress=False)
    return model, report, stats, x


def _modules(model):
    return dict(model.named_modules())


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_joint_permutation_leaves_the_eager_function_unchanged_float64(kind):
    """Permuting the producers' output rows (and bias) and the consumer's input columns by the shared P, as
    the compiled and compressed models hold them, computes the same function (float64, to rounding)."""
    model, report, stats, x = _sparsified(kind, torch.float64)
    assert stats.chains and all(report[c].in_perm_from == p for p, cs in stats.chains for c in cs)
    with torch.no_grad():
        ref = _out(model, x)
        permuted = copy.deepcopy(model)
        mods = _modules(permuted)
        for producers, consumers in stats.chains:
            shared = get_sparsity(_modules(model)[consumers[0]]).in_perm
            assert shared is not None and not torch.equal(shared, torch.arange(shared.numel()))
            for p in producers:
                state = get_sparsity(_modules(model)[p])
                assert torch.equal(state.out_perm, shared) and state.out_linked and not state.in_linked
                mods[p].weight.copy_(mods[p].weight[shared])
                if mods[p].bias is not None:
                    mods[p].bias.copy_(mods[p].bias[shared])
            for c in consumers:
                assert get_sparsity(_modules(model)[c]).in_linked
                mods[c].weight.copy_(mods[c].weight[:, shared])
        torch.testing.assert_close(_out(permuted, x), ref, rtol=1e-12, atol=1e-12)
        # the compressed model skips both index ops and computes the same (float64 reference op)
        compressed = compress_(copy.deepcopy(model), progress=False)
        for producers, consumers in stats.chains:
            assert all(_modules(compressed)[p].out_linked for p in producers)
            assert all(_modules(compressed)[c].in_linked for c in consumers)
        torch.testing.assert_close(_out(compressed, x), ref, rtol=1e-12, atol=1e-12)


def test_joint_off_or_no_chain_keeps_independent_permutations():
    model, report, stats, _ = _sparsified("llama", joint=False)
    assert not any(r.in_perm_from or r.out_perm_to for r in report.sparsified)
    assert not any(get_sparsity(m).links is not None for m in _modules(model).values() if get_sparsity(m))
    # the joint search keeps the consumer's own choice: down_proj keeps exactly what it keeps independently
    joint_model, joint_report, _, _ = _sparsified("llama", joint=True)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"):
        assert joint_report[name].importance_kept == pytest.approx(report[name].importance_kept, rel=1e-6)


class Recorder:
    """A vnm backend keeping each lowered graph and report (inductor off: the FX graph runs as is)."""

    def __init__(self, **options):
        self.options = {"inductor": False, "force_sparse": True, **options}
        self.graphs, self.reports = [], []

    def __call__(self, gm, example_inputs):
        from vnm_compile.backend import last_report

        fn = vnm_backend(gm, example_inputs, options=self.options)
        self.graphs.append(gm)
        self.reports.append(last_report())
        return fn


def _index_ops(gm) -> list:
    """Every channel-reordering index op of the graph (function or method form)."""
    return [
        n
        for n in gm.graph.nodes
        if (n.op == "call_function" and n.target in INDEX_TARGETS)
        or (n.op == "call_method" and n.target in ("index_select", "__getitem__") and _indexes_with_tensor(n))
    ]


def _indexes_with_tensor(node) -> bool:
    if node.target == "index_select":
        return True
    items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    return any(hasattr(i, "op") and i.op == "get_attr" for i in items)


def _module_of(node) -> str:
    """The dotted name of the module whose forward made this call (Dynamo's nn_module_stack)."""
    path = list(node.meta.get("nn_module_stack", {}).values())[-1][0]
    path = re.sub(r"\[(\d+)\]", r".\1", re.sub(r"\[['\"](\w+)['\"]\]", r".\1", path))
    return re.sub(r"^L\.self\.|^L\['self'\]\.", "", path).replace("._modules.", ".")


def _pairs(stats, attention: bool = True) -> list:
    """The linked (producers, consumers) pairs: MLP chains and (with ``attention``) attention v -> o pairs."""
    return list(stats.chains) + ([((lk.v,), (lk.o,)) for lk in stats.attention] if attention else [])


def _expected_index_ops(model, chains) -> int:
    """What the graph must hold: one index op on x per distinct (input, in_perm) reader group unless
    cancelled, one on the output per out_perm unless cancelled, one on the bias of a cancelled producer."""
    linked_consumers = {c for _, cs in chains for c in cs}
    linked_producers = {p for ps, _ in chains for p in ps}
    n, seen_in = 0, set()
    for name, m in _modules(model).items():
        state = get_sparsity(m) if isinstance(m, torch.nn.Linear) else None
        if state is None:
            continue
        if state.in_perm is not None and name not in linked_consumers and id(state.in_perm) not in seen_in:
            seen_in.add(id(state.in_perm))
            n += 1
        if state.out_perm is not None:
            n += 1 if name not in linked_producers else int(m.bias is not None)
    return n


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_compiled_masked_form_cancels_the_mlp_index_ops_and_matches_eager(kind):
    model, _, stats, x = _sparsified(kind)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-4, atol=1e-4)
    gm, report = rec.graphs[-1], rec.reports[-1]
    # 1. the expected index ops and no others (Llama returns its KV cache from the graph: v_proj's output is
    # used there in original order, so the attention pairs keep their index ops; BERT/ViT cancel them too)
    cancelled = _pairs(stats, attention=kind != "llama")
    assert stats.attention
    assert len(_index_ops(gm)) == _expected_index_ops(model, cancelled), gm.code
    # 2. no index op between a chain's producers and its consumer: the consumer reads what they produce
    calls = {n.meta.get(LAYER_META): n for n in gm.graph.nodes if n.target is COMPRESSED_OP}
    for producers, consumers in cancelled:
        for c in consumers:
            x_node = calls[c].args[0]
            assert x_node not in _index_ops(gm)
            assert report[c].permutations.startswith("in: cancelled with")
        for p in producers:
            assert report[p].permutations.endswith("out: cancelled with " + consumers[0].rsplit(".", 1)[-1])
            assert not any(n.meta.get(PERM_META) in (("out", p), ("bias", p)) for n in gm.graph.nodes)
        if producers[0] not in calls:  # v_proj: one launch with q/k (fuse_compressed) whose outputs keep theirs
            continue
        call = calls[producers[0]]  # gate and up share one launch (fuse_compressed): its outputs, split
        outputs = [u for v in call.users for u in ([v] if v.target is not torch.split else v.users)]
        assert outputs and not any(u in _index_ops(gm) for o in outputs for u in [o, *o.users])
    # 3. the other attention layers keep theirs, and say how
    attn = [r for r in report.lowered if r.name not in {n for ps, cs in cancelled for n in ps + cs}]
    assert attn and all(r.permutations.startswith(("in: index op on x", "out:", "none")) for r in attn)
    assert not any("cancelled" in r.permutations for r in attn if "mlp" not in r.name)
    # 4. a second call (same shapes) and a second compile of the same model build nothing new / the same graph
    code = gm.code
    with torch.no_grad():
        _out(compiled, x)
        assert len(rec.graphs) == 1
        torch._dynamo.reset()
        again = torch.compile(model, backend=rec, fullgraph=True)
        _out(again, x)
    assert len(rec.graphs) == 2 and rec.graphs[-1].code == code


def test_joint_off_keeps_the_index_ops_and_says_so():
    model, _, stats, x = _sparsified("llama", joint=False)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-4, atol=1e-4)
    report = rec.reports[-1]
    assert not any("cancelled" in r.permutations for r in report.lowered)
    assert len(_index_ops(rec.graphs[-1])) == _expected_index_ops(model, [])
    assert "in: index op on x shared by 2" in report["model.layers.0.mlp.up_proj"].permutations


def test_fold_option_reports_folded():
    model, _, _, x = _sparsified("bert")
    rec = Recorder(permutations="fold")
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-4, atol=1e-4)
    report = rec.reports[-1]
    assert all("folded into the kernel indices" in r.permutations for r in report.lowered if r.permuted)
    assert "permutations: in+out folded" in report.table() or "permutations: in folded" in report.table()


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_compressed_form_skips_the_mlp_index_ops_eager_compiled_and_reloaded(kind):
    model, _, stats, x = _sparsified(kind)
    with torch.no_grad():
        ref = _out(model, x)
        compressed = compress_(copy.deepcopy(model), progress=False)
        torch.testing.assert_close(_out(compressed, x), ref, rtol=1e-4, atol=1e-4)
        rec = Recorder()
        torch.testing.assert_close(_out(torch.compile(compressed, backend=rec, fullgraph=True), x), ref,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        linked = sum(len(ps) + len(cs) for ps, cs in _pairs(stats))
        mods = _modules(compressed)
        layers = [m for m in mods.values() if hasattr(m, "in_linked")]
        assert sum(m.in_linked + m.out_linked for m in layers) == linked
        # the graph holds each module's index ops but the linked ones (a linked producer's bias is gathered),
        # less the input index ops of siblings fused into one launch (fuse_compressed drops them)
        per_module = sum((m.in_perm is not None and not m.in_linked)
                         + (m.out_perm is not None and (not m.out_linked or m.bias is not None)) for m in layers)  # fmt: skip
        report = rec.reports[-1]
        gm = rec.graphs[-1]
        fused_away = report.compressed_calls - report.compressed_launches
        assert len(_index_ops(gm)) == per_module - fused_away, [n.name for n in _index_ops(gm)]
        consumers = {c for _, cs in _pairs(stats) for c in cs}
        seen = set()
        for node in gm.graph.nodes:  # the consumers read the producers' (element-wise combined) output directly
            name = _module_of(node) if node.target is COMPRESSED_OP else ""
            hit = [c for c in consumers if name == c or name.endswith("." + c)]
            if hit:
                seen.update(hit)
                assert node.args[0] not in _index_ops(gm)
        assert seen == consumers
        with tempfile.TemporaryDirectory() as d:
            save_compressed(compressed, d)
            fresh, _, _ = MODELS[kind]()
            load_compressed(fresh, d)
            torch.testing.assert_close(_out(fresh, x), ref, rtol=1e-4, atol=1e-4)
            assert (
                sum(m.in_linked + m.out_linked for m in _modules(fresh).values() if hasattr(m, "in_linked")) == linked
            )
        back = decompress_(compressed, progress=False)
        assert sum(get_sparsity(m).links is not None for m in _modules(back).values()
                   if isinstance(m, torch.nn.Linear) and get_sparsity(m)) == linked  # fmt: skip


def test_compress_refuses_a_linked_layer_without_its_partner():
    model, _, stats, _ = _sparsified("bert")
    (producers, consumers), *_ = stats.chains
    consumer = _modules(model)[consumers[0]]
    state = get_sparsity(consumer)  # as if only the producer had been linked:
    set_sparsity(consumer, LinearSparsity(state.pattern, state.mask, state.in_perm, state.out_perm, state.score))
    with pytest.raises(ValueError, match="no compressed layer reads that order"):
        compress_(model, progress=False)
