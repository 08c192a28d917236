import copy

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, sparsify_
from vnm_compile.state import load_sparsity_, sparsity_state_dict


def test_save_and_restore_through_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 64))
    fresh = copy.deepcopy(model)
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=False, min_numel=0), progress=False)
    # the state is held as buffers: the model's own state_dict carries the same keys sparsity_state_dict gives
    sd = model.state_dict()
    assert set(sd) == set(fresh.state_dict()) | set(sparsity_state_dict(model))
    assert all(torch.equal(sd[k], v) for k, v in sparsity_state_dict(model).items())
    safetensors.save_file(sparsity_state_dict(model), tmp_path / "sparsity.safetensors")
    restored = load_sparsity_(fresh, safetensors.load_file(tmp_path / "sparsity.safetensors"))
    assert restored == ["0", "2"]
    for a, b in zip(model, fresh, strict=True):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight, b.weight)
            assert torch.equal(get_sparsity(a).mask, get_sparsity(b).mask)
            assert get_sparsity(b).pattern == get_sparsity(a).pattern


def test_load_rejects_mismatch():
    model = nn.Sequential(nn.Linear(64, 80))
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=False, min_numel=0), progress=False)
    sd = sparsity_state_dict(model)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        load_sparsity_(nn.Sequential(nn.ReLU()), sd)
    with pytest.raises(ValueError, match="shape"):
        load_sparsity_(nn.Sequential(nn.Linear(64, 81)), sd)
    sd["0.vnm_mask"] = torch.ones(80, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="does not obey"):
        load_sparsity_(nn.Sequential(nn.Linear(64, 80)), sd)


def _sparse_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=False, min_numel=0), progress=False)
    return model


def test_deepcopy_keeps_the_state_visible_from_the_weights(monkeypatch):
    """The compiler sees weights only: a deep-copied model's weights must map to (copied) states."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vnm_compile.backend import last_report

    model = _sparse_mlp()
    clone = copy.deepcopy(model)
    for i in (0, 2):
        state, copied = get_sparsity(model[i].weight), get_sparsity(clone[i].weight)
        assert copied is not None and copied is not state and torch.equal(copied.mask, state.mask)
        assert copied.mask.data_ptr() != state.mask.data_ptr()
    torch._dynamo.reset()
    x = torch.randn(3, 64)
    compiled = torch.compile(clone, backend="vnm", options={"inductor": False, "force_sparse": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(last_report().lowered) == 2


def test_pickle_round_trip_keeps_the_state(tmp_path):
    model = _sparse_mlp()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for i in (0, 2):
        assert torch.equal(get_sparsity(loaded[i]).mask, get_sparsity(model[i]).mask)
        assert get_sparsity(loaded[i].weight) is get_sparsity(loaded[i])


def _shared_perm_mlp():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(64, 48), "b": nn.Linear(64, 48), "c": nn.Linear(48, 32)})
    sparsify_(model, VNMConfig("16:2:5", score="abs", min_numel=0), groups=[["a", "b"]], progress=False)
    assert get_sparsity(model["a"]).in_perm is get_sparsity(model["b"]).in_perm  # one shared tensor
    return model


def test_shared_permutations_save_through_safetensors(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _shared_perm_mlp()
    safetensors.save_file(sparsity_state_dict(model), tmp_path / "s.safetensors")
    fresh = nn.ModuleDict({"a": nn.Linear(64, 48), "b": nn.Linear(64, 48), "c": nn.Linear(48, 32)})
    assert load_sparsity_(fresh, safetensors.load_file(tmp_path / "s.safetensors")) == ["a", "b", "c"]
    for k in "abc":
        a, b = get_sparsity(model[k]), get_sparsity(fresh[k])
        assert torch.equal(a.mask, b.mask) and torch.equal(a.in_perm, b.in_perm)


@pytest.mark.parametrize("assign", [False, True])
def test_state_dict_round_trip_keeps_the_state_visible_to_the_compiler(assign, monkeypatch):
    """load_state_dict (in place or assign=True) of a sparsified model's state into another sparsified model:
    the loaded masks are the state, and the compiler finds it from the (new) weights."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vnm_compile.backend import last_report

    model = _sparse_mlp()
    other = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    sparsify_(other, VNMConfig("16:2:4", score="abs", permute=False, min_numel=0), progress=False)
    other.load_state_dict(model.state_dict(), assign=assign)
    for i in (0, 2):
        state = get_sparsity(other[i].weight)
        assert state is not None and state.pattern == get_sparsity(model[i]).pattern
        assert torch.equal(state.mask, get_sparsity(model[i]).mask)
    torch._dynamo.reset()
    x = torch.randn(3, 64)
    compiled = torch.compile(other, backend="vnm", options={"inductor": False, "force_sparse": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(last_report().lowered) == 2


def test_a_fresh_model_takes_the_state_dict_after_load_sparsity():
    model = _sparse_mlp()
    sd = model.state_dict()
    fresh = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    load_sparsity_(fresh, sd)
    fresh.load_state_dict(sd)  # strict: the sparsity buffers now exist
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_loaded_pickle_compiles_sparse_without_touching_the_modules(tmp_path, monkeypatch):
    """The compiler sees weights only: an unpickled model's weights must already map to their states."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from vnm_compile.backend import last_report

    model = _sparse_mlp()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert get_sparsity(loaded[0].weight) is not None and get_sparsity(loaded[2].weight) is not None
    torch._dynamo.reset()
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            torch.compile(loaded, backend="vnm", options={"inductor": False, "force_sparse": True})(x), model(x)
        )
    assert len(last_report().lowered) == 2
