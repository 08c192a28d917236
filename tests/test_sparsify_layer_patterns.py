"""VNMConfig.layer_patterns: one pattern per layer (or dense), through sparsify_, compile, compress_ and checkpoints."""

import json
from dataclasses import replace

import pytest
import torch

from vnm_compile import VNMConfig, VNMPattern, calibrate, get_sparsity, is_vnm, sparsify_
from vnm_compile.deploy import compress_, compressed_linears, load_compressed, save_compressed

transformers = pytest.importorskip("transformers")

# layers.0 at 128:2:5 (rows 64/128/320: not all multiples of V), the rest 64:2:8, k_proj of layer 1 64:2:5
# (q/k/v read one input: k gets its own input permutation), layer 1's down_proj dense.
LAYER_PATTERNS = {"layers.0.*": "128:2:5", "layers.1.self_attn.k_proj": "64:2:5", "layers.1.mlp.down_proj": "dense"}
EXPECTED = {
    **{f"layers.0.{p}": "128:2:5" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    **{f"layers.1.{p}": "64:2:8" for p in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj",
                                          "mlp.gate_proj", "mlp.up_proj")},
    "layers.1.self_attn.k_proj": "64:2:5",
}  # fmt: skip


def _llama(model_class: str = "LlamaModel"):
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=300)  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, model_class)(cfg).eval(), cfg


def _batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (2, 11), generator=g) for _ in range(n)]


def _check_layers(model, report, prefix: str = "") -> None:
    assert {r.name: str(r.pattern) for r in report.sparsified} == {prefix + k: v for k, v in EXPECTED.items()}
    assert report[prefix + "layers.1.mlp.down_proj"].skipped == "dense by VNMConfig.layer_patterns"
    assert get_sparsity(model.get_submodule(prefix + "layers.1.mlp.down_proj")) is None
    for r in report.sparsified:
        state = get_sparsity(model.get_submodule(r.name))
        assert state.pattern == r.pattern == VNMPattern.parse(EXPECTED[r.name.removeprefix(prefix)])
        assert is_vnm(state.mask, state.pattern, state.in_perm, state.out_perm)
        assert r.density == pytest.approx(float(state.mask.float().mean()))
    attn = model.get_submodule(prefix + "layers.1.self_attn")
    q, k, v = (get_sparsity(getattr(attn, f"{p}_proj")) for p in "qkv")
    # one input permutation per pattern among the layers reading one tensor
    assert q.in_perm is not None and q.in_perm is v.in_perm and k.in_perm is not q.in_perm
    assert report[prefix + "layers.1.self_attn.q_proj"].shares_input_perm == (prefix + "layers.1.self_attn.v_proj",)
    attn0 = model.get_submodule(prefix + "layers.0.self_attn")
    assert get_sparsity(attn0.q_proj).in_perm is get_sparsity(attn0.k_proj).in_perm


def test_config_parses_layer_patterns_and_round_trips_json():
    cfg = VNMConfig("64:2:8", layer_patterns={"layers.0.*": "128:2:5", "*.k_proj": None, "lm": "DENSE"})
    assert cfg.layer_patterns == (("layers.0.*", VNMPattern(128, 2, 5)), ("*.k_proj", None), ("lm", None))
    assert VNMConfig.from_json(cfg.to_json()) == cfg
    assert json.loads(cfg.to_json())["layer_patterns"] == {"layers.0.*": "128:2:5", "*.k_proj": "dense", "lm": "dense"}
    assert VNMConfig("64:2:8", layer_patterns=[("a", "16:2:5")]) == VNMConfig("64:2:8", layer_patterns={"a": "16:2:5"})
    # the first matching entry wins; a name matches exactly, as a dotted suffix or as a glob; else config.pattern
    assert cfg.pattern_for("layers.0.self_attn.k_proj") == VNMPattern(128, 2, 5)
    assert cfg.pattern_for("layers.1.self_attn.k_proj") is None
    assert cfg.pattern_for("model.lm") is None
    assert cfg.pattern_for("layers.1.mlp.up_proj") == VNMPattern(64, 2, 8)
    assert cfg.for_pattern(VNMPattern(128, 2, 5)) == VNMConfig("128:2:5")
    with pytest.raises(ValueError, match=r"layer_patterns\['up'\].*'dense'"):
        VNMConfig(layer_patterns={"up": "64:2"})
    with pytest.raises(ValueError, match="not be a string"):
        VNMConfig(layer_patterns="64:2:8")
    with pytest.raises(ValueError, match="pairs"):
        VNMConfig(layer_patterns=[("up", "64:2:8", "x")])


def test_mixed_patterns_compile_and_compress_match_the_masked_model(tmp_path):
    model, cfg = _llama("LlamaForCausalLM")
    batches = _batches()
    stats = calibrate(model, batches, progress=False)
    report = sparsify_(model, VNMConfig("64:2:8", layer_patterns=LAYER_PATTERNS), stats, progress=False)
    _check_layers(model, report, prefix="model.")
    summary = report.summary()
    assert "128:2:5 x7 / 64:2:8 x5 / 64:2:5 x1" in summary and "2 left dense" in summary  # + lm_head
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vnm", options={"force_sparse": True, "inductor": False})
        torch.testing.assert_close(compiled(ids).logits, ref, rtol=1e-5, atol=1e-5)
        from vnm_compile.backend import last_report

        assert len(last_report().lowered) == 13
        compress_(model, progress=False)
        patterns = {name: str(m.pattern) for name, m in compressed_linears(model).items()}
        assert patterns == {"model." + k: v for k, v in EXPECTED.items()}
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend="vnm")(ids).logits, ref, rtol=1e-5, atol=1e-5)
        save_compressed(model, tmp_path)
        with torch.device("meta"):
            fresh = transformers.LlamaForCausalLM(cfg).eval()
        load_compressed(fresh, tmp_path)
        assert {name: str(m.pattern) for name, m in compressed_linears(fresh).items()} == patterns
        torch.testing.assert_close(fresh(ids).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score,reconstruct", [("obs", True), ("ria", False)])
def test_mixed_patterns_with_second_moments(score, reconstruct):
    model, _ = _llama()
    config = VNMConfig("64:2:8", score=score, reconstruct=reconstruct, layer_patterns=LAYER_PATTERNS)
    report = sparsify_(model, config, data=_batches() if score == "obs" else None,
                       stats=None if score == "obs" else calibrate(model, _batches(), progress=False),
                       progress=False)  # fmt: skip
    _check_layers(model, report)
    if reconstruct:
        assert all(r.error is not None and r.error <= r.error_masked + 1e-6 for r in report.sparsified)


def test_already_sparsified_layers_are_checked_against_their_own_pattern():
    model, _ = _llama()
    config = VNMConfig("64:2:8", score="abs", layer_patterns=LAYER_PATTERNS)
    sparsify_(model, config, progress=False)
    again = sparsify_(model, config, progress=False)
    assert not again.sparsified and len(again.skipped) - len(again.dense) == 13
    changed = VNMConfig("64:2:8", score="abs", layer_patterns={"layers.0.mlp.*": "64:2:8", **LAYER_PATTERNS})
    with pytest.raises(ValueError, match=r"3 layer\(s\) are already sparsified with another pattern: "
                                         r"layers.0.mlp.gate_proj \(128:2:5\)"):  # fmt: skip
        sparsify_(model, changed, progress=False)
    dense = VNMConfig("64:2:8", score="abs", layer_patterns={"layers.0.mlp.up_proj": "dense", **LAYER_PATTERNS})
    for overwrite in (False, True):  # a pruned layer cannot be made dense again by sparsify_
        with pytest.raises(ValueError, match=r"layers.0.mlp.up_proj \(128:2:5, asked dense\)"):
            sparsify_(model, replace(dense, overwrite=overwrite), progress=False)
