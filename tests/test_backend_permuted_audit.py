"""Issue 25 audit gap (docs/test_coverage.md): permuted transformers models through backend="vnm" with its
default options (inductor on), not only with inductor off (tests/test_joint_permutations.py) or unpermuted
weights (tests/test_backend_models.py). Compiled equals eager, and eager equals the masked model in float64.
"""

import copy

import pytest
import torch

from vnm_compile import VNMConfig, calibrate, get_sparsity, sparsify_

transformers = pytest.importorskip("transformers")


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaModel(cfg), torch.randint(0, 96, (2, 11)), torch.randint(0, 96, (3, 7))


def _bert():
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=144, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    return model, torch.randint(0, 96, (2, 11)), torch.randint(0, 96, (3, 7))


@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
def test_permuted_model_through_the_default_vnm_backend_equals_eager(build):
    from vnm_compile.backend import last_report

    torch.manual_seed(0)
    model, batch, x = build()
    model.eval()
    stats = calibrate(model, [batch], progress=False)
    report = sparsify_(model, VNMConfig("16:2:8", min_numel=0), stats, progress=False)  # default: permute=True
    names = {r.name for r in report.sparsified}
    assert len(names) >= 6
    assert all(get_sparsity(model.get_submodule(n)).in_perm is not None for n in names)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x).last_hidden_state
        eager = model(x).last_hidden_state
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vnm", options={"force_sparse": True})(x).last_hidden_state
        compile_report = last_report()
        torch._dynamo.reset()
    assert {r.name for r in compile_report.lowered} == names  # every permuted layer ran the sparse op
    assert all(r.permuted for r in compile_report.lowered)
    torch.testing.assert_close(eager.double(), ref64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
