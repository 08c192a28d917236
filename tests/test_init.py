"""The package's public names, the old spellings kept importable, and a light ``import vnm_compile``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import vnm_compile


def test_every_public_name_resolves():
    for name in vnm_compile.__all__:
        assert getattr(vnm_compile, name) is not None, name
    assert set(vnm_compile.__all__) <= set(dir(vnm_compile))
    # the user's entry points
    assert {"calibrate", "sparsify_", "VNMConfig", "recover_", "to_onnx", "last_report", "select_pattern"} <= set(
        vnm_compile.__all__
    )


def test_internals_stay_importable_but_out_of_all():
    from vnm_compile import ChannelObserver, LinearSparsity, get_sparsity, load_sparsity_, sparsity_state_dict
    from vnm_compile.calibration.observer import ChannelObserver as observer
    from vnm_compile.state import LinearSparsity as state

    assert ChannelObserver is observer and LinearSparsity is state
    assert callable(get_sparsity) and callable(load_sparsity_) and callable(sparsity_state_dict)
    assert "ChannelObserver" not in vnm_compile.__all__ and "LinearSparsity" not in vnm_compile.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        vnm_compile.no_such_name  # noqa: B018


def test_subpackages_as_attributes():
    assert vnm_compile.kernels.vnm_linear is not None
    assert vnm_compile.backend.BACKEND_NAME == "vnm"


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_light_and_the_backend_still_works():
    """``import vnm_compile`` loads no Triton, passes or kernels; torch.compile(backend="vnm") works after it."""
    result = _fresh(
        """
        import json, sys, time
        import torch
        t = time.perf_counter()
        import vnm_compile
        seconds = time.perf_counter() - t
        heavy = [m for m in ("triton", "torch._dynamo", "scipy", "vnm_compile.passes", "vnm_compile.kernels",
                             "vnm_compile.recovery", "vnm_compile.export", "onnx") if m in sys.modules]
        y = torch.compile(torch.nn.Linear(64, 64), backend="vnm", options={"inductor": False})(torch.randn(2, 64))
        print(json.dumps({"heavy": heavy, "seconds": seconds, "shape": list(y.shape),
                          "report": vnm_compile.last_report() is not None}))
        """
    )
    assert result["shape"] == [2, 64] and result["report"]
    if vnm_compile._entry_point_installed():
        assert result["heavy"] == [], result
    else:  # on the path but not installed: the backend has to be registered at import (torch._dynamo)
        assert "torch._dynamo" in result["heavy"]


def test_backend_registered_on_import_once_dynamo_is_loaded():
    result = _fresh(
        """
        import json, sys
        import torch._dynamo
        from torch._dynamo.backends import registry
        import vnm_compile
        print(json.dumps({"registered": "vnm" in registry._COMPILER_FNS}))
        """
    )
    assert result["registered"]
