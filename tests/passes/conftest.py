"""Fixtures of the pass tests; the helpers live in pass_helpers.py (its docstring says why)."""

from __future__ import annotations

import pass_helpers
import pytest
import torch


@pytest.fixture(autouse=True)
def _reference_op_path(monkeypatch):
    # The CPU custom op takes the plain PyTorch reference unless TRITON_INTERPRET=1 (CI sets it):
    # the pass tests check graph rewriting, not the interpreted kernels.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return pass_helpers.Toy().eval()


@pytest.fixture
def h():
    """The helpers (test modules here have no package to import them from)."""
    return pass_helpers
