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
    # the model's own state_dict keeps its keys: state is not stored as buffers
    assert set(model.state_dict()) == set(fresh.state_dict())
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
