"""The benchmark's grid options and its markdown table (CPU: no timing, only what gets measured and written)."""

import json

import pytest

from vnm_compile.kernels.benchmark import GRIDS, READ_CONFIGS, custom_grid, read_words, write_results
from vnm_compile.kernels.vnm_triton import interpreter_ready


def test_custom_grid_replaces_what_is_given_and_drops_the_sweep():
    base = GRIDS["default"]
    assert custom_grid(base, None, None, None) is base
    g = custom_grid(base, ["vit-b", "2304x768"], [16, 2048], None)
    assert [s[:2] for s in g.shapes] == [(768, 768), (3072, 768), (768, 3072), (2304, 768)]
    assert g.tokens == [16, 2048] and g.patterns == base.patterns
    assert g.sweep_shape is None and g.extra_shapes == []
    g = custom_grid(base, None, None, ["64:2:8"])
    assert g.shapes == base.shapes and g.tokens == base.tokens and g.patterns == ["64:2:8"]


@pytest.mark.parametrize(
    "shapes, tokens, patterns, match",
    [(["12x"], None, None, "OUTxIN"), (["vit-z"], None, None, "OUTxIN"), (None, [0, 16], None, "positive"),
     (None, None, ["64:2:x"], "64:2:x")],
)  # fmt: skip
def test_custom_grid_refuses_bad_input(shapes, tokens, patterns, match):
    with pytest.raises(ValueError, match=match):
        custom_grid(GRIDS["quick"], shapes, tokens, patterns)


def test_table_shows_the_sparse_tensor_core_timings(tmp_path):
    meta = {
        "gpu": "Test GPU", "torch": "2.x", "triton": "3.x", "cuda": "13.0", "dtype": "float16",
        "date_utc": "2026-11-30 00:00:00", "command": "bench_linear.py --shapes llama2-7b",
        "measured_copy_bandwidth_GBps": 3000.0, "timing": "median", "cslt_layout": "feature-major",
    }  # fmt: skip
    rec = {
        "name": "llama2-7b qkvo", "part": "main", "out_features": 4096, "in_features": 4096, "tokens": 2048,
        "dense_us": 100.0, "cslt_us": 70.0, "vnm_us": {"64:2:8": 125.0}, "vnm_bytes": {"64:2:8": 1},
        "vnm_expanded_us": {"64:2:8": 110.0}, "vnm_interleaved_us": {}, "vnm_tc_us": {"64:2:8": 80.0},
    }  # fmt: skip
    write_results({"meta": meta, "records": [rec]}, tmp_path)
    md = (tmp_path / "linear.md").read_text()
    assert "| 80.0 | 1.25x |" in md  # the sparse-TC columns of the record's row
    assert "| 2048 | 64:2:8 | 1.6x | 0.80x | no | 0.91x | no | 1.25x | no |" in md
    assert json.loads((tmp_path / "linear.json").read_text())["records"][0]["vnm_tc_us"] == {"64:2:8": 80.0}


@pytest.mark.parametrize("words", [1, 1000, 4097])
def test_the_read_floor_kernel_reads_every_word_once(words):
    """read_words (the kernel read_floor_us times) sums each program's words: every word counted once,
    partial last programs masked. On the GPU where there is one, else under Triton's interpreter."""
    torch = pytest.importorskip("torch")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not interpreter_ready():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1 set before triton is imported")
    src = torch.randint(0, 1000, (words,), dtype=torch.int32, device=device)
    for block, steps, warps in [(64, 1, 1), (128, 4, 2), READ_CONFIGS[0]]:
        out = read_words(src, block, steps, warps)
        assert out.numel() == -(-words // (block * steps))
        assert out.sum().item() == src.sum().item()
        assert out[0].item() == src[: block * steps].sum().item()
    with pytest.raises(ValueError, match="int32"):
        read_words(src.float())
