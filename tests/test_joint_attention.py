"""Joint attention permutations (VNMConfig.joint_permutations, v_proj -> o_proj, per head): detection
(calibration/attention.py), the constrained search (permutation.py's in_segments / in_ties), the eager
function unchanged, the compiled graph (cancel_permutations across attention) and the compressed model
(VNMLinear) without the pair's index ops, and models whose structure is unknown or wrongly claimed.

Tiny Llama (grouped-query attention), Mistral (one kv head), BERT and ViT from transformers configs with
random weights; float64 where the function is compared exactly.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vnm_compile import VNMConfig, VNMPattern, calibrate, compress_, get_sparsity, sparsify_, vnm_mask
from vnm_compile.calibration.attention import AttentionLink, find_attention_links
from vnm_compile.calibration.permutation import find_shared_permutation, kept_importance
from vnm_compile.passes.lower_linears import PERM_META
from vnm_compile.sparsify import _unpermute
from vnm_compile.state import LinearSparsity, set_sparsity

transformers = pytest.importorskip("transformers")

from test_joint_permutations import Recorder, _bert, _llama, _vit  # noqa: E402  (tests/ is on sys.path under pytest)

PATTERN = "16:2:8"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _mistral(dtype=torch.float32):
    torch.manual_seed(1)
    cfg = transformers.MistralConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                     max_position_embeddings=64)  # fmt: skip
    model = transformers.MistralForCausalLM(cfg).to(dtype).eval()
    return model, [torch.randint(0, 96, (2, 11)) for _ in range(2)], torch.randint(0, 96, (3, 7))


MODELS = {"llama": _llama, "mistral": _mistral, "bert": _bert, "vit": _vit}
HEADS = {"llama": (16, 4, 2), "mistral": (32, 4, 1), "bert": (16, 4, 4), "vit": (16, 4, 4)}


def _out(model, x):
    # no KV cache: a cache returned from the graph holds v_proj's output in original order (index ops kept)
    out = model(x, use_cache=False) if hasattr(model, "generate") else model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _sparsified(kind: str, dtype=torch.float32):
    model, batches, x = MODELS[kind](dtype)
    stats = calibrate(model, batches, progress=False)
    report = sparsify_(model, VNMConfig(PATTERN, min_numel=0, joint_permutations=True), stats, progress=False)
    return model, report, stats, x


def _per_head(perm: torch.Tensor, d: int) -> bool:
    heads = torch.arange(perm.numel()) // d
    return torch.equal(heads[perm], heads)


# ---------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize("kind", list(MODELS))
def test_attention_pairs_found_with_their_head_structure(kind):
    model, batches, _ = MODELS[kind]()
    links = find_attention_links(model, batches[0])
    assert len(links) == 2
    for link in links:
        assert (link.head_dim, link.n_heads, link.n_kv_heads) == HEADS[kind]
        assert link.v.rsplit(".", 1)[-1] in ("v_proj", "value")
        assert link.o.endswith(("o_proj", "attention.output.dense"))


def test_one_token_cannot_prove_the_heads():
    """With one token every permutation of v commutes with attention: the heads cannot be told apart."""
    model, _, _ = _llama()
    assert find_attention_links(model, torch.randint(0, 96, (2, 1))) == []


class _MislabelledAttention(nn.Module):
    """Claims 4 heads of 16 (num_heads, head_dim) but computes 8 heads of 8."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden) for _ in range(4))
        self.num_heads, self.head_dim = 4, 16

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 8, 8).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return x + self.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def _mislabelled():
    torch.manual_seed(0)
    model = nn.Sequential(_MislabelledAttention(), _MislabelledAttention()).eval()
    return model, [torch.randn(2, 9, 64) for _ in range(2)], torch.randn(3, 5, 64)


def test_unknown_structure_keeps_independent_permutations_and_stays_correct():
    model, batches, x = _mislabelled()
    stats = calibrate(model, batches, progress=False)
    assert stats.attention == []  # the claimed 16-wide heads fail the proof
    report = sparsify_(model, VNMConfig(PATTERN, min_numel=0, joint_permutations=True), stats, progress=False)
    assert not any(r.in_perm_from or r.out_perm_to for r in report.sparsified)
    assert any(get_sparsity(m.v_proj).out_perm is not None for m in model)
    rec = Recorder()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=rec, fullgraph=True)(x), model(x), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    assert not any("cancelled" in r.permutations for r in rec.reports[-1].lowered)


def test_a_wrongly_claimed_link_is_not_cancelled_by_the_compiler():
    """A link handed to sparsify_ by hand with the wrong head size: the graph proof refuses it."""
    model, batches, x = _mislabelled()
    stats = calibrate(model, batches, progress=False)
    wrong = [AttentionLink(f"{i}.v_proj", f"{i}.o_proj", 16, 4, 4) for i in range(2)]
    report = sparsify_(model, VNMConfig(PATTERN, min_numel=0, joint_permutations=True), stats, progress=False,
                       attention=wrong)  # fmt: skip
    assert report["0.o_proj"].in_perm_from == ("0.v_proj",)
    rec = Recorder()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=rec, fullgraph=True)(x), model(x), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    report = rec.reports[-1]
    assert not _per_head(get_sparsity(model[0].o_proj).in_perm, 8)  # it crosses the true 8-wide heads
    assert not report["0.o_proj"].permutations.startswith("in: cancelled")
    assert "cancelled" not in report["0.v_proj"].permutations


# ---------------------------------------------------------------------------------------------- search


def test_constrained_search_keeps_columns_in_their_head_and_tied_copies_equal():
    torch.manual_seed(0)
    link = AttentionLink("v", "o", head_dim=16, n_heads=4, n_kv_heads=2)
    scores = torch.rand(64, 64) ** 3
    for pattern in ("16:2:8", "16:2:5"):  # 5 does not divide 16: M-groups straddle heads
        in_perm, (out_perm,) = find_shared_permutation([scores], pattern, in_segments=link.segments(),
                                                       in_ties=link.ties())  # fmt: skip
        assert _per_head(in_perm, 16) and not torch.equal(in_perm, torch.arange(64))
        v = link.v_perm(in_perm)
        assert v is not None and torch.equal(link.o_perm(v), in_perm)  # query heads 0, 1 read kv head 0 alike
        assert kept_importance(scores, pattern, in_perm, out_perm) >= kept_importance(scores, pattern)
        free, (free_out,) = find_shared_permutation([scores], pattern)
        assert kept_importance(scores, pattern, free, free_out) >= kept_importance(scores, pattern, in_perm, out_perm)


def test_link_permutation_round_trip_and_refusals():
    link = AttentionLink("v", "o", head_dim=4, n_heads=4, n_kv_heads=2)
    v = torch.tensor([1, 0, 3, 2, 4, 6, 5, 7])
    o = link.o_perm(v)
    assert o.tolist() == [1, 0, 3, 2, 5, 4, 7, 6, 8, 10, 9, 11, 12, 14, 13, 15]
    assert torch.equal(link.v_perm(o), v)
    assert link.v_perm(torch.arange(16).roll(1)) is None  # crosses heads
    untied = o.clone()
    untied[4:6] = torch.tensor([4, 5])  # query head 1 would not follow kv head 0's permutation
    assert link.v_perm(untied) is None
    with pytest.raises(ValueError, match="in_segments"):
        find_shared_permutation([torch.rand(8, 16)], "4:2:8", in_segments=torch.zeros(3, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------- eager


@pytest.mark.parametrize("kind", list(MODELS))
def test_joint_attention_permutation_leaves_the_eager_function_unchanged_float64(kind):
    """v_proj's rows (and bias) by its output permutation, o_proj's columns by its input one, as the compiled
    and compressed models hold them: the same function (float64, to rounding); compress_ too."""
    model, report, stats, x = _sparsified(kind, torch.float64)
    mods = dict(model.named_modules())
    with torch.no_grad():
        ref = _out(model, x)
        permuted = copy.deepcopy(model)
        pmods = dict(permuted.named_modules())
        assert len(stats.attention) == 2
        for link in stats.attention:
            sv, so = get_sparsity(mods[link.v]), get_sparsity(mods[link.o])
            assert sv.out_linked and so.in_linked and report[link.o].in_perm_from == (link.v,)
            assert _per_head(so.in_perm, link.head_dim) and not torch.equal(
                so.in_perm, torch.arange(so.in_perm.numel())
            )
            assert torch.equal(link.o_perm(sv.out_perm), so.in_perm)
            pmods[link.v].weight.copy_(pmods[link.v].weight[sv.out_perm])
            if pmods[link.v].bias is not None:
                pmods[link.v].bias.copy_(pmods[link.v].bias[sv.out_perm])
            pmods[link.o].weight.copy_(pmods[link.o].weight[:, so.in_perm])
        torch.testing.assert_close(_out(permuted, x), ref, rtol=1e-12, atol=1e-12)
        compressed = compress_(copy.deepcopy(model), progress=False)
        cmods = dict(compressed.named_modules())
        assert all(cmods[lk.v].out_linked and cmods[lk.o].in_linked for lk in stats.attention)
        torch.testing.assert_close(_out(compressed, x), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------- compiled


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_compiled_cancels_the_attention_index_ops_and_matches_eager(kind):
    model, _, stats, x = _sparsified(kind)
    rec = Recorder()
    with torch.no_grad():
        ref = _out(model, x)
        torch.testing.assert_close(_out(torch.compile(model, backend=rec, fullgraph=True), x), ref, rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    gm, report = rec.graphs[-1], rec.reports[-1]
    for link in stats.attention:
        assert report[link.v].permutations.endswith("out: cancelled with " + link.o.rsplit(".", 1)[-1])
        assert report[link.o].permutations.startswith("in: cancelled with " + link.v.rsplit(".", 1)[-1])
        tags = [n.meta.get(PERM_META) for n in gm.graph.nodes]
        assert ("out", link.v) not in tags and ("bias", link.v) not in tags and ("in", link.o) not in tags
    # the compressed model (VNMLinear skips the linked index ops) compiles to the same function
    compressed = compress_(copy.deepcopy(model), progress=False)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(_out(torch.compile(compressed, backend=Recorder(), fullgraph=True), x), ref,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def _hand_sparsified_bert(v_perm: torch.Tensor):
    """Tiny BERT pruned by |W| with layer 0's value/output.dense linked by ``v_perm`` (recorded by hand)."""
    model, _, x = _bert()
    pattern = VNMPattern.parse(PATTERN)
    v_name, o_name = "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense"
    links = {v_name: (None, v_perm, [0, 1]), o_name: (v_perm, None, [1, 0])}
    with torch.no_grad():
        for name, m in model.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            in_perm, out_perm, link = links.get(name, (None, None, None))
            s = m.weight.abs()
            s = s[out_perm] if out_perm is not None else s
            s = s[:, in_perm] if in_perm is not None else s
            mask = _unpermute(vnm_mask(s, pattern), in_perm, out_perm)
            m.weight.mul_(mask)
            link = None if link is None else torch.tensor(link)
            set_sparsity(m, LinearSparsity(pattern, mask, in_perm, out_perm, "abs", link))
    return model, x, v_name, o_name


@pytest.mark.parametrize("whole_heads", [False, True])
def test_pass_cancels_per_head_permutations_only(whole_heads):
    """A recorded link whose permutation moves whole heads (not allowed: q and k stay) keeps its index ops;
    a per-head one is cancelled; both compile to the eager function."""
    d = 16
    if whole_heads:  # heads 0 and 1 swapped: keeps V-row blocks and M-groups whole, so the masks stay valid
        perm = torch.cat([torch.arange(d, 2 * d), torch.arange(d), torch.arange(2 * d, 4 * d)])
    else:  # each head reversed
        perm = torch.cat([torch.arange(h * d, (h + 1) * d).flip(0) for h in range(4)])
    model, x, v_name, o_name = _hand_sparsified_bert(perm)
    rec = Recorder()
    with torch.no_grad():
        out = torch.compile(model, backend=rec, fullgraph=True)(x).last_hidden_state
        torch.testing.assert_close(out, model(x).last_hidden_state, rtol=1e-4, atol=1e-4)
    report = rec.reports[-1]
    assert report[o_name].permutations.startswith("in: cancelled") is not whole_heads
    assert ("cancelled with dense" in report[v_name].permutations) is not whole_heads


class _VariantAttention(nn.Module):
    """4 heads of 16; ``variant`` "cast": the value goes through a dtype cast (followed by the pass);
    "gate": the attention output is gated per channel before o_proj (an element-wise op with another tensor:
    v_proj's permutation would not commute with it)."""

    def __init__(self, variant: str, hidden: int = 64) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj, self.gate = (nn.Linear(hidden, hidden) for _ in range(5))
        self.num_heads, self.head_dim, self.variant = 4, 16, variant

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, 4, 16).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.variant == "cast":
            v = v.float()
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        if self.variant == "gate":
            out = out * torch.sigmoid(self.gate(x))
        return x + self.o_proj(out)


@pytest.mark.parametrize("variant", ["cast", "gate"])
def test_pass_follows_casts_and_refuses_gates(variant):
    torch.manual_seed(0)
    model = nn.Sequential(_VariantAttention(variant)).eval()
    batches, x = [torch.randn(2, 9, 64) for _ in range(2)], torch.randn(3, 5, 64)
    stats = calibrate(model, batches, progress=False)
    assert len(stats.attention) == (1 if variant == "cast" else 0)  # the gate fails the eager proof
    link = [AttentionLink("0.v_proj", "0.o_proj", 16, 4, 4)]  # for the gate: claimed by hand
    sparsify_(model, VNMConfig(PATTERN, min_numel=0, joint_permutations=True), stats, progress=False,
              attention=link)  # fmt: skip
    assert get_sparsity(model[0].o_proj).in_linked
    rec = Recorder()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=rec, fullgraph=True)(x), model(x), rtol=1e-4,
                                   atol=1e-4)  # fmt: skip
    cancelled = rec.reports[-1]["0.o_proj"].permutations.startswith("in: cancelled with v_proj")
    assert cancelled is (variant == "cast")
