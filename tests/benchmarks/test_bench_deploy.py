"""bench_deploy.random_sparsify_: what the deployment benchmarks prune with (CPU): every decoder linear obeys the
pattern inside its recorded permutations (shared by siblings' inputs, identity when permute=False), and
compress_ of it computes what the masked model computes."""

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_deploy  # noqa: E402

from vnm_compile import VNMPattern, is_vnm  # noqa: E402
from vnm_compile.deploy import compress_  # noqa: E402
from vnm_compile.state import get_sparsity  # noqa: E402


def _tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=64)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaModel(cfg).eval()


@pytest.mark.parametrize("permute", [True, False])
def test_random_sparsify_prunes_every_decoder_linear_with_permutations(permute):
    model = _tiny_llama()
    pattern = VNMPattern.parse("64:2:8")
    assert bench_deploy.random_sparsify_(model, str(pattern), permute=permute) == 14
    for layer in model.layers:
        attn = layer.self_attn
        states = {n: get_sparsity(m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        assert len(states) == 7 and all(s is not None for s in states.values())
        for name, lin in layer.named_modules():
            if not isinstance(lin, torch.nn.Linear):
                continue
            s = states[name]
            assert (s.in_perm is not None) == permute and (s.out_perm is not None) == permute
            w = lin.weight.detach()
            if permute:
                w = w[s.out_perm][:, s.in_perm]
                assert not torch.equal(s.in_perm, torch.arange(lin.in_features))
            assert is_vnm(w, pattern) and torch.equal(lin.weight != 0, s.mask & (lin.weight != 0))
        if permute:  # q/k/v share the input permutation, as calibrate() groups them
            q, k, v = (get_sparsity(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
            assert torch.equal(q.in_perm, k.in_perm) and torch.equal(q.in_perm, v.in_perm)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        want = model(ids).last_hidden_state
        got = compress_(model, progress=False)(ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
