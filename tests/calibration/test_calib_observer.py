import pytest
import torch
from torch import nn

from vnm_compile import calibrate


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.a(x)) * scale)


def test_sums_of_squares_match_manual():
    torch.manual_seed(0)
    model = TwoInputs()
    batches = [torch.randn(2, 4, 6), (torch.randn(3, 6), 2.0), {"x": torch.randn(5, 6), "scale": 0.5}]
    stats = calibrate(model, batches, progress=False)
    inputs = torch.cat([batches[0].reshape(-1, 6), batches[1][0], batches[2]["x"]])
    assert torch.allclose(stats.act_norm("a"), inputs.square().sum(0).sqrt())
    hidden = torch.cat(
        [torch.relu(model.a(batches[0])).reshape(-1, 5), torch.relu(model.a(batches[1][0])) * 2.0,
         torch.relu(model.a(batches[2]["x"])) * 0.5]
    )  # fmt: skip
    assert torch.allclose(stats.act_norm("b"), hidden.square().sum(0).sqrt(), atol=1e-6)
    assert stats.tokens("a") == 8 + 3 + 5 and stats.batches == 3
    assert "unused" not in stats
    with pytest.raises(KeyError, match="never called"):
        stats.act_norm("unused")


def test_hooks_removed_even_on_error():
    model = TwoInputs()

    def bad_batches():
        yield torch.randn(2, 6)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader broke"):
        calibrate(model, bad_batches(), progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())
    calibrate(model, [torch.randn(2, 6)], progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_filter_fn():
    stats = calibrate(TwoInputs(), [torch.randn(2, 6)], filter_fn=lambda name, m: name == "b", progress=False)
    assert stats.names() == ["b"]


def test_errors():
    with pytest.raises(ValueError, match="no batches"):
        calibrate(TwoInputs(), [], progress=False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        calibrate(TwoInputs(), [torch.full((2, 6), float("inf"))], progress=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        calibrate(nn.ReLU(), [torch.randn(2)], progress=False)
