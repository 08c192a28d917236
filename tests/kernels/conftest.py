"""Fixtures the kernel tests share."""

import pytest


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
