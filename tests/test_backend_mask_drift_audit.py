"""Issue 31 audit (docs/test_coverage.md): a weight that left its mask by ONE element is caught.

tests/test_backend.py edits every pruned position at once; a check that samples the weight, or that only
compares norms, would pass that and miss one stray nonzero. Both moments are checked: at compile time
(the weight changed between sparsify_ and torch.compile) and at the next call of a compiled model.
"""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, sparsify_

OPTIONS = {"inductor": False, "force_sparse": True}


def _model():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 8)).eval()
    sparsify_(model, VNMConfig("16:2:5", score="abs", ignore=("4",), min_numel=0), progress=False)
    return model


def _one_pruned_position(layer: nn.Linear) -> tuple[int, int]:
    i, j = (~get_sparsity(layer).mask).nonzero()[-1].tolist()  # the last one: not where a sample starts
    return i, j


def test_one_stray_nonzero_is_refused_at_compile_time_naming_the_layer():
    model = _model()
    i, j = _one_pruned_position(model[2])
    with torch.no_grad():
        model[2].weight[i, j] = 1e-3
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"outside their recorded V:N:M mask: '2' \(1 of 7680\)") as info:
        torch.compile(model, backend="vnm", options=OPTIONS)(torch.randn(2, 64))
    assert "clear_sparsity" in str(info.value) and "overwrite=True" in str(info.value)


def test_one_stray_nonzero_after_compiling_is_refused_at_the_next_call():
    model = _model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="vnm", options=OPTIONS)
    x = torch.randn(2, 64)
    with torch.no_grad():
        want = compiled(x)
        i, j = _one_pruned_position(model[0])
        model[0].weight[i, j] = 0.5
        with pytest.raises(ValueError, match=r"outside their recorded V:N:M mask: '0' \(1 of 6144\)"):
            compiled(x)
        model[0].weight[i, j] = 0.0  # put back: runs again, same result
        torch.testing.assert_close(compiled(x), want, rtol=0, atol=0)
    torch._dynamo.reset()
