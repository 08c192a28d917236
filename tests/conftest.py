"""Test-suite wide: the ``gpu`` marker skips tests on machines without the GPU they need.

``@pytest.mark.gpu``: needs a CUDA GPU. ``@pytest.mark.gpu(sparse_tc=True)``: needs one that runs the
sparse tensor-core kernels (kernels.sparse_tc: compute capability >= 8.0 and PyTorch's NVRTC helpers).
Run only the GPU tests with ``pytest -m gpu``.

The ``interpret_unless_gpu`` fixture runs Triton kernels on CPU tensors under the interpreter.
"""

from __future__ import annotations

import functools

import pytest


@functools.cache
def _missing(sparse_tc: bool) -> str | None:
    """Why a ``gpu`` test cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if sparse_tc:
        from vnm_compile.kernels.sparse_tc import sparse_tc_available

        if not sparse_tc_available():
            return "needs a CUDA GPU of compute capability >= 8.0 with NVRTC (the sparse tensor-core kernels)"
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Import every module holding Triton kernels now, under the environment the run started with: Triton
    decides at decoration whether a kernel is interpreted, so a test that unsets TRITON_INTERPRET
    (tests/passes) must not be the first to import one, or that module's kernels stay compiled ones, which
    cannot run on CPU tensors, for the rest of the session."""
    import importlib

    for name in ("vnm_triton", "tc_dense", "rows_dense", "benchmark"):
        importlib.import_module(f"vnm_compile.kernels.{name}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("gpu")
        if marker is None:
            continue
        unknown = set(marker.kwargs) - {"sparse_tc"}
        if marker.args or unknown:
            raise pytest.UsageError(f"{item.nodeid}: pytest.mark.gpu takes only sparse_tc=True, got {marker}")
        reason = _missing(bool(marker.kwargs.get("sparse_tc")))
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def interpret_unless_gpu(monkeypatch, request):
    """Run the Triton kernels under the interpreter (CPU tensors), except in ``gpu`` tests, which compile them
    for CUDA tensors; skip when Triton was imported without TRITON_INTERPRET=1."""
    if request.node.get_closest_marker("gpu"):
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vnm_compile.kernels.vnm_triton import interpreter_ready

    if not interpreter_ready():
        pytest.skip("triton was imported without TRITON_INTERPRET=1: its interpreter cannot run here")
