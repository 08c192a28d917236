"""prewarm_paths (`vnm bench --prewarm`): the dense-or-sparse choices of vnm::compressed_linear measured ahead
and written where choose_path reads them. CPU with a fake timer: the cache logic, not the timing."""

import json

import pytest
import torch

from vnm_compile.cli import model_shapes
from vnm_compile.kernels import compressed, dispatch
from vnm_compile.kernels.compressed import _disk_choices, _disk_key, _path_key, path_cache_file, prewarm_paths
from vnm_compile.kernels.vnm_triton import _AUTOTUNE_CACHE


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VNM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "gpu_slug", lambda device=None: "fake-gpu")
    _disk_choices.cache_clear()
    before = dict(_AUTOTUNE_CACHE)
    yield tmp_path
    _AUTOTUNE_CACHE.clear()
    _AUTOTUNE_CACHE.update(before)
    _disk_choices.cache_clear()


class FakeTimer:
    """ms per path: sparse wins below ``cross`` tokens; records what it was asked to time."""

    def __init__(self, cross: int) -> None:
        self.cross, self.calls = cross, []

    def __call__(self, path, fn) -> float:
        tokens = fn().shape[0]  # runs the real path on CPU (small shapes)
        self.calls.append((path, tokens))
        return (1.0 if tokens < self.cross else 3.0) if path == "sparse" else 2.0


def test_prewarm_writes_the_keys_choose_path_reads(cache):
    timer = FakeTimer(cross=100)
    shapes, cpu = [(48, 40), (40, 96)], torch.device("cpu")
    done = prewarm_paths(shapes, ["16:2:8"], [1, 16, 33, 64, 200, 256], cpu, torch.float32, timer=timer, progress=False)
    # decode counts (<= 32) are never measured; 33 and 64 share a bucket, 200 and 256 too
    assert {b for _, b in timer.calls} == {64, 256}
    assert len(timer.calls) == 2 * 2 * 2 * 2  # shapes x buckets x (rebuilt, held dense weight) x both paths
    file = path_cache_file(cpu)
    assert file == cache / "fake-gpu" / file.name and file.name.startswith("paths-torch")
    on_disk = json.loads(file.read_text())
    assert on_disk == done and len(done) == 8
    for out, in_f in shapes:
        for bucket, want in ((64, "sparse"), (256, "dense")):
            for held in (False, True):
                key = _path_key(cpu, compressed.LAYOUT_ROWS, torch.float32, out, in_f, 16, 2, 8, bucket, held)
                assert on_disk[_disk_key(key)] == want and _AUTOTUNE_CACHE[key] == want
    assert sum(k.endswith("|held") for k in on_disk) == 4


def test_prewarm_keeps_what_is_cached_and_prefers_the_table_on_a_near_tie(cache):
    cpu = torch.device("cpu")
    prewarm_paths([(48, 40)], ["16:2:8"], [64], cpu, torch.float32, timer=FakeTimer(100), progress=False)
    again = FakeTimer(cross=0)  # would now choose dense
    assert prewarm_paths([(48, 40)], ["16:2:8"], [64], cpu, torch.float32, timer=again, progress=False) == {}
    assert again.calls == []  # already decided on this GPU: not measured again

    def tie(path, fn):
        return 1.0 if path == "sparse" else 0.98  # dense 2 % faster: not a clear win

    seed = compressed._seed(compressed.LAYOUT_ROWS, 40, 96, compressed.VNMPattern.parse("16:2:8"), 64, cpu)
    done = prewarm_paths([(40, 96)], ["16:2:8"], [64], cpu, torch.float32, timer=tie, progress=False)
    assert list(done.values()) == [seed, seed]  # the rebuilt and the held dense weight


def test_model_shapes_include_fused_siblings():
    llama3 = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
              "num_key_value_heads": 8, "hidden_act": "silu"}  # fmt: skip
    shapes = model_shapes(llama3)
    assert (1024, 4096) in shapes and (4096 + 2 * 1024, 4096) in shapes and (2 * 14336, 4096) in shapes
    assert (4096, 14336) in shapes and (14336, 4096) in shapes
    bert = {"model_type": "bert", "hidden_size": 384, "intermediate_size": 1536, "num_attention_heads": 12,
            "hidden_act": "gelu"}  # fmt: skip
    assert model_shapes(bert) == sorted({(384, 384), (1536, 384), (384, 1536), (1152, 384)})
