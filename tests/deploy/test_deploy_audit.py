"""Gaps found auditing issue 24's "Done when" list (docs/test_coverage.md), CPU.

- save_compressed / load_compressed round trips exact for fp16, bf16 and fp32, permuted and not, ragged
  shapes, into a model built on the meta device (no dense weight allocated), and back through decompress_;
- a GPT-2 (transformers Conv1D) compressed checkpoint loads into a fresh GPT-2 built on the meta device;
- compressed tiny Llama / BERT / ViT from transformers configs: torch.compile with the default inductor
  backend equals eager, and eager equals the masked model in float64.
"""

import copy

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, calibrate, get_sparsity, sparsify_
from vnm_compile.deploy import VNMLinear, compress_, compressed_linears, decompress_, load_compressed, save_compressed

pytest.importorskip("safetensors")

from test_deploy import _Allocations  # noqa: E402  (the allocation counter; same folder, on sys.path under pytest)

SHAPES = ((97, 131), (131, 67), (67, 203))  # (in, out): primes and non-multiples of V and M


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(SHAPES):
        layers += [nn.Linear(a, b, bias=i != 1), nn.GELU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


@pytest.mark.parametrize(
    "dtype, permute, pattern",
    [
        (torch.float16, True, "16:2:5"),
        (torch.bfloat16, True, "16:2:5"),
        (torch.float32, True, "16:2:5"),
        (torch.float32, False, "16:2:5"),
        (torch.bfloat16, False, "2:4"),
    ],
)
def test_save_and_load_round_trip_is_exact_for_each_dtype(tmp_path, dtype, permute, pattern):
    model = _mlp(dtype)
    sparsify_(model, VNMConfig(pattern, score="abs", permute=permute, min_numel=0), progress=False)
    masked = {
        n: (m.weight.detach().clone(), get_sparsity(m)) for n, m in model.named_modules() if n and hasattr(m, "weight")
    }
    x = torch.randn(2, 5, 97, dtype=torch.float64)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x)  # the masked model in float64
        compress_(model, progress=False)
        saved_out = model(x.to(dtype))
    save_compressed(model, tmp_path, max_shard_size=20_000)  # several shards
    with torch.device("meta"):
        fresh = _mlp(dtype, seed=1)
    dense_sizes = {a * b for a, b in SHAPES}
    with _Allocations() as seen:
        load_compressed(fresh, tmp_path)
    assert seen.sizes and not dense_sizes & set(seen.sizes)  # never a dense weight of a compressed layer
    assert not [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.device.type == "meta"]
    assert set(compressed_linears(fresh)) == set(masked)
    for name, m in compressed_linears(model).items():
        got = fresh.get_submodule(name)
        assert isinstance(got, VNMLinear) and got.weight_dtype == dtype and got.pattern == m.pattern
        assert torch.equal(got.to_dense(), masked[name][0]) and torch.equal(got.mask(), masked[name][1].mask)
        for a, b in ((got.in_perm, m.in_perm), (got.out_perm, m.out_perm), (got.bias, m.bias)):
            assert (a is None and b is None) or torch.equal(a, b), name
    with torch.no_grad():
        out = fresh(x.to(dtype))
    assert torch.equal(out, saved_out)  # bit for bit the saved model's function
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(out.double(), ref64, rtol=tol, atol=tol)
    decompress_(fresh, progress=False)  # and back to the masked dense form, exactly
    for name, (w, state) in masked.items():
        m = fresh.get_submodule(name)
        assert isinstance(m, nn.Linear) and torch.equal(m.weight, w)
        assert get_sparsity(m).pattern == state.pattern and torch.equal(get_sparsity(m).mask, state.mask)


def _gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=101,
                                  bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers, cfg


def test_a_gpt2_compressed_checkpoint_loads_into_a_fresh_meta_gpt2(tmp_path):
    """GPT-2's linears are transformers Conv1D: a model built from the config has Conv1D where the saved
    model had VNMLinear (sparsify_ converted them); load_compressed replaces them too, and decompress_
    gives back linears whose state_dict keeps Conv1D's (in, out) layout."""
    transformers, cfg = _gpt2()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    sparsify_(model, VNMConfig("16:2:5", score="abs", min_numel=0), progress=False)
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        compress_(model, progress=False)
    assert len(compressed_linears(model)) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block; lm_head is tied
    save_compressed(model, tmp_path)
    with torch.device("meta"):
        fresh = transformers.GPT2LMHeadModel(cfg).eval()
    dense_sizes = {m.out_features * m.in_features for m in compressed_linears(model).values()}
    with _Allocations() as seen:
        load_compressed(fresh, tmp_path)
    assert not dense_sizes & set(seen.sizes)
    assert set(compressed_linears(fresh)) == set(compressed_linears(model))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied
    for name, m in compressed_linears(model).items():
        assert torch.equal(fresh.get_submodule(name).to_dense(), m.to_dense()), name
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, rtol=1e-5, atol=1e-5)
    # decompress_ gives GPT-2's own checkpoint layout back (Conv1D weights (in, out)): a dense GPT-2 loads it
    dense = transformers.GPT2LMHeadModel(cfg).eval()
    for m in (model, fresh):
        sd = decompress_(copy.deepcopy(m), progress=False).state_dict()
        assert sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
        dense.load_state_dict({k: v for k, v in sd.items() if ".vnm_" not in k})
        with torch.no_grad():
            torch.testing.assert_close(dense(ids).logits, ref, rtol=1e-5, atol=1e-5)
    wrong = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                                                 vocab_size=101, n_inner=128))  # fmt: skip
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc' is 128x64"):
        load_compressed(wrong, tmp_path)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaModel(cfg), torch.randint(0, 96, (2, 11)), torch.randint(0, 96, (3, 7))


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=144, num_hidden_layers=1,
                                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return (
        transformers.BertModel(cfg, add_pooling_layer=False),
        torch.randint(0, 96, (2, 11)),
        torch.randint(0, 96, (3, 7)),
    )


def _vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, intermediate_size=144, num_hidden_layers=1, num_attention_heads=4,
                                 image_size=16, patch_size=4)  # fmt: skip
    return transformers.ViTModel(cfg, add_pooling_layer=False), torch.randn(2, 3, 16, 16), torch.randn(3, 3, 16, 16)


@pytest.mark.parametrize("build", [_llama, _bert, _vit], ids=["llama", "bert", "vit"])
def test_compressed_transformers_models_compile_with_inductor_and_equal_eager(build):
    """Default options (RIA scores, permutations, joint MLP permutations) then compress_: torch.compile with
    the default inductor backend equals eager, and eager equals the masked model in float64."""
    torch.manual_seed(0)
    model, batch, x = build()
    model.eval()
    stats = calibrate(model, [batch], progress=False)
    report = sparsify_(model, VNMConfig("16:2:8", min_numel=0), stats, progress=False)
    assert len(report.sparsified) >= 6
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double() if x.is_floating_point() else x).last_hidden_state
        compress_(model, progress=False)
        assert any(m.in_perm is not None for m in compressed_linears(model).values())
        eager = model(x).last_hidden_state
        torch.testing.assert_close(eager.double(), ref64, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
        compiled = torch.compile(model)(x).last_hidden_state
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_streaming_prune_and_compress_takes_gpt2_conv1d_layers():
    """sparsify_and_compress_ on GPT-2 (transformers Conv1D) equals sparsify_(data=) then compress_; it raised
    "'Conv1D' object has no attribute 'in_features'" (sparsify_ converted the Conv1D layers, streaming did not)."""
    transformers, cfg = _gpt2()
    from vnm_compile.deploy import sparsify_and_compress_

    torch.manual_seed(0)
    base = transformers.GPT2Model(cfg).eval()
    batches = [torch.randint(0, 101, (2, 16)) for _ in range(2)]
    config = VNMConfig("16:2:5", score="obs", reconstruct=True, min_numel=0)
    streamed, in_memory = copy.deepcopy(base), copy.deepcopy(base)
    report = sparsify_and_compress_(streamed, config, batches, device="cpu", progress=False)
    sparsify_(in_memory, config, data=batches, progress=False)
    compress_(in_memory, progress=False)
    assert len(report.sparsified) == 8 and all(r.note == "Conv1D converted to nn.Linear" for r in report.sparsified)
    assert set(compressed_linears(streamed)) == set(compressed_linears(in_memory))
    for name, m in compressed_linears(in_memory).items():
        assert torch.equal(compressed_linears(streamed)[name].to_dense(), m.to_dense()), name
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        assert torch.equal(streamed(ids).last_hidden_state, in_memory(ids).last_hidden_state)
