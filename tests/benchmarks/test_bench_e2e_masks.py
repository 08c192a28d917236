"""bench_e2e.skip_unneeded_masks: DeiT and an uncached Llama prefill give the same outputs without the
materialized attention mask, eager and compiled; decode with a cache keeps its mask."""

import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("the mask builders bench_e2e replaces exist from transformers 5", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_e2e  # noqa: E402
import transformers.models.deit.modeling_deit as deit  # noqa: E402
import transformers.models.llama.modeling_llama as llama  # noqa: E402


@pytest.fixture
def unmasked(monkeypatch):
    """Both builders restored after the test; Llama's records its calls (the list yielded)."""
    originals = {"deit": deit.create_bidirectional_mask, "llama": llama.create_causal_mask}
    monkeypatch.setattr(deit, "create_bidirectional_mask", originals["deit"])  # undone at teardown
    monkeypatch.setattr(llama, "create_causal_mask", originals["llama"])
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return originals["llama"](*args, **kwargs)

    monkeypatch.setattr(llama, "create_causal_mask", counting)
    yield calls


def _models():
    torch.manual_seed(0)
    dcfg = transformers.DeiTConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=32, patch_size=8
    )
    lcfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    dcfg._attn_implementation = lcfg._attn_implementation = "sdpa"
    return deit.DeiTModel(dcfg, add_pooling_layer=False).eval(), llama.LlamaModel(lcfg).eval()


def test_outputs_are_unchanged_without_the_masks(unmasked):
    dm, lm = _models()
    px = torch.randn(3, 3, 32, 32)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        d_ref = dm(pixel_values=px).last_hidden_state
        l_ref = lm(input_ids=ids, use_cache=False).last_hidden_state
        patched = bench_e2e.skip_unneeded_masks()
        assert sorted(patched) == [
            "transformers.models.deit.modeling_deit.create_bidirectional_mask",
            "transformers.models.llama.modeling_llama.create_causal_mask",
        ]
        assert bench_e2e.skip_unneeded_masks() == []  # idempotent
        assert deit.create_bidirectional_mask(config=dm.config, inputs_embeds=torch.zeros(1, 5, 64),
                                              attention_mask=None) is None  # fmt: skip
        unmasked.clear()
        l_new = lm(input_ids=ids, use_cache=False).last_hidden_state
        assert unmasked == []  # the uncached prefill built no mask: SDPA's is_causal did the masking
        torch.testing.assert_close(dm(pixel_values=px).last_hidden_state, d_ref)
        torch.testing.assert_close(l_new, l_ref)
        torch._dynamo.reset()
        compiled = torch.compile(dm, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(pixel_values=px).last_hidden_state, d_ref)
        torch._dynamo.reset()


def test_a_cached_decode_keeps_its_mask(unmasked):
    _, lm = _models()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        bench_e2e.skip_unneeded_masks()
        out = lm(input_ids=ids, use_cache=True)
        unmasked.clear()
        nxt = torch.randint(0, 100, (1, 1))
        got = lm(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True).last_hidden_state
        assert len(unmasked) == 1  # the real builder ran, with the cache (its name differs across versions)
        assert unmasked[0].get("past_key_values", unmasked[0].get("cache")) is not None
        full = lm(input_ids=torch.cat([ids, nxt], 1), use_cache=False).last_hidden_state[:, -1:]
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
