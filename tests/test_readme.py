"""The README's Python examples run as written (in order, one namespace, on CPU), and its first two
commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_opens_with_the_two_commands_ci_runs():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert first == [
        "pip install torch==2.13.0 -e '.[demo]' && vnm demo",
        "pip install torch==2.13.0 -e '.[test]' && TRITON_INTERPRET=1 python -m pytest -q",
    ]
    assert first[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="the export example needs the export extra")
    pytest.importorskip("onnxscript", reason="the export example needs the export extra")
    blocks = _python_blocks()
    assert len(blocks) >= 3, "the quick start, recovery and export examples"
    monkeypatch.chdir(tmp_path)  # the export example writes model.onnx
    namespace: dict = {"__name__": "readme"}

    def run(i: int) -> None:
        exec(compile(blocks[i], f"README.md python block {i + 1}", "exec"), namespace)

    import torch

    from vnm_compile import is_vnm
    from vnm_compile.state import get_sparsity

    # 1. quick start: the compiled model computes what the eager sparsified one does
    run(0)
    model, x = namespace["model"], namespace["batches"][0]
    with torch.no_grad():
        torch.testing.assert_close(namespace["y"], model(x), rtol=1e-4, atol=1e-4)
        assert (namespace["y"] - namespace["dense"](x)).abs().max() > 1e-3  # and it is pruned
    assert "64:2:8" in capsys.readouterr().out  # the sparsify and compile reports
    # 2. recovery and export: the pattern survives training, the ONNX file is written
    for i in range(1, len(blocks)):
        run(i)
    for layer in (model[0], model[2]):
        state = get_sparsity(layer.weight)
        assert state is not None and str(state.pattern) == "64:2:8"
        assert is_vnm(layer.weight != 0, state.pattern, state.in_perm, state.out_perm)
    assert namespace["result"] is not None
    assert (tmp_path / "model.onnx").is_file()
    # 3. compressed deployment: the checkpoint loaded into a meta-built model computes the sparsified function
    from vnm_compile.deploy import VNMLinear

    fresh = namespace["fresh"]
    assert isinstance(fresh[0], VNMLinear) and isinstance(fresh[2], VNMLinear)
    with torch.no_grad():
        torch.testing.assert_close(namespace["y_deployed"], namespace["deployed"](x), rtol=1e-4, atol=1e-4)
