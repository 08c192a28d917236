"""sparsify_'s second-order path (calibration/second_order.py): work shared by the linears of one input."""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, sparsify_


class QKV(nn.Module):
    """q/k/v read one input (one group), o reads their product (a second group)."""

    def __init__(self, d: int = 40):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) * self.k(x)) + self.v(x))


@pytest.fixture
def factorisations(monkeypatch):
    """Counts of torch.linalg.cholesky_ex and torch.cholesky_inverse calls while the test runs."""
    counts = {"cholesky": 0, "inverse": 0}
    cholesky, inverse = torch.linalg.cholesky_ex, torch.cholesky_inverse

    def counting_cholesky(*args, **kwargs):
        counts["cholesky"] += 1
        return cholesky(*args, **kwargs)

    def counting_inverse(*args, **kwargs):
        counts["inverse"] += 1
        return inverse(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_cholesky)
    monkeypatch.setattr(torch, "cholesky_inverse", counting_inverse)
    return counts


def test_h_is_factored_once_per_group(factorisations):
    """q/k/v share one factorisation of H + λI: per group one Cholesky of H, one inverse, one upper
    Cholesky of H⁻¹ (SparseGPT's), and o one more float64 Cholesky for its dense-target fit; factoring
    per linear took 13 Cholesky factorisations and 8 inverses here."""
    torch.manual_seed(0)
    model = QKV()
    data = [torch.randn(3, 50, 40) for _ in range(2)]
    config = VNMConfig("8:2:5", score="obs", reconstruct=True, permute=True, min_numel=0)
    report = sparsify_(model, config, data=data, progress=False)
    assert [r.name for r in report.sparsified] == ["q", "k", "v", "o"]
    assert all(r.permuted for r in report.sparsified)  # the shared factors serve permuted coordinates
    assert factorisations == {"cholesky": 2 + 3, "inverse": 1 + 1}
