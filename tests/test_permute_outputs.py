"""VNMConfig(permute_outputs=False): input permutations only (plus the output permutations joint permutations
link to a consumer's input), so the compiled graph and the compressed model run no output permutation.

Tiny Llama and BERT from transformers configs, random weights, calibrated, sparsified with the real search.
"""

import copy

import pytest
import torch

from vnm_compile import VNMConfig, calibrate, compress_, get_sparsity, sparsify_
from vnm_compile.passes.lower_linears import PERM_META

transformers = pytest.importorskip("transformers")

from test_joint_permutations import MODELS, Recorder, _expected_index_ops, _index_ops, _out, _pairs  # noqa: E402

PATTERN = "16:2:8"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _pruned(kind: str, **config):
    model, batches, x = MODELS[kind]()
    stats = calibrate(model, batches, progress=False)
    report = sparsify_(model, VNMConfig(PATTERN, min_numel=0, **config), stats, progress=False)
    return model, report, stats, x


def _states(model) -> dict:
    return {n: get_sparsity(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and get_sparsity(m)}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_no_output_permutation_and_the_input_ones_still_searched(kind):
    model, report, _, _ = _pruned(kind, permute_outputs=False)
    states = _states(model)
    assert states and all(s.out_perm is None for s in states.values())
    # the input permutations are searched as before: some layers are permuted and none keeps less importance
    # than without any permutation; the default still searches output permutations
    assert any(s.in_perm is not None for s in states.values())
    _, unpermuted, _, _ = _pruned(kind, permute=False)
    for r in report.sparsified:
        assert r.importance_kept >= unpermuted[r.name].importance_kept * (1 - 1e-9), r.name
    assert report.mean_importance_kept() > unpermuted.mean_importance_kept()
    searched, _, _, _ = _pruned(kind)
    assert any(s.out_perm is not None for s in _states(searched).values())


def test_joint_links_keep_their_output_permutation_and_nothing_else_does():
    model, report, stats, _ = _pruned("llama", permute_outputs=False, joint_permutations=True)
    states = _states(model)
    pairs = _pairs(stats)  # MLP chains and attention v_proj -> o_proj
    producers = {p for ps, _ in pairs for p in ps}
    assert stats.chains and stats.attention
    for name, s in states.items():
        assert (s.out_perm is not None) == (name in producers), name
    for ps, cs in stats.chains:  # (attention: v's rows are o's columns per kv head, tests/test_joint_attention.py)
        assert all(torch.equal(states[p].out_perm, states[cs[0]].in_perm) for p in ps)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_compiled_and_compressed_run_no_output_permutation(kind):
    model, _, _, x = _pruned(kind, permute_outputs=False)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        ref = _out(model, x)
        torch.testing.assert_close(_out(compiled, x), ref, rtol=1e-4, atol=1e-4)
        compressed = compress_(copy.deepcopy(model), progress=False)
        torch.testing.assert_close(_out(compressed, x), ref, rtol=1e-4, atol=1e-4)
    gm, report = rec.graphs[-1], rec.reports[-1]
    assert not any(isinstance(n.meta.get(PERM_META), tuple) and n.meta[PERM_META][0] in ("out", "bias")
                   for n in gm.graph.nodes)  # fmt: skip
    ops = _index_ops(gm)
    assert ops and len(ops) == _expected_index_ops(model, [])  # one per input group, none on outputs
    assert all("out:" not in r.permutations for r in report.lowered), [r.permutations for r in report.lowered]


def test_joint_and_no_output_permutations_leave_only_the_input_index_ops_of_unlinked_groups():
    model, _, stats, x = _pruned("bert", permute_outputs=False, joint_permutations=True)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(compiled, x), _out(model, x), rtol=1e-4, atol=1e-4)
    assert len(_index_ops(rec.graphs[-1])) == _expected_index_ops(model, _pairs(stats))


def test_permute_outputs_must_be_a_bool():
    with pytest.raises(TypeError, match="permute_outputs"):
        VNMConfig("64:2:8", permute_outputs="no")
