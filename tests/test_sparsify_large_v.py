"""V >= 128 end to end on CPU: sparsify_ (ABS, RIA + permutations, OBS + reconstruction), compress_,
compressed checkpoints, the compiled model, the dispatcher's tables and `vnm select`.

Rows that are not a multiple of V are zero-padded as at V = 64: the tiny Llama's 64-row k/v, 128-row
q/o and 320-row gate/up never fill a 256-row block.
"""

import json
import math

import pytest
import torch

from vnm_compile import VNMConfig, VNMPattern, calibrate, get_sparsity, is_vnm, sparsify_
from vnm_compile.deploy import compress_, compressed_linears, load_compressed, save_compressed
from vnm_compile.kernels import dispatch, tables

transformers = pytest.importorskip("transformers")

LARGE_V = ["128:2:5", "128:2:8", "128:2:16", "256:2:8"]


def _llama():
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=300)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval(), cfg


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (2, 11), generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    "pattern,score",
    [("128:2:5", "ria"), ("128:2:8", "obs"), ("128:2:16", "abs"), ("256:2:8", "ria"), ("256:2:5", "obs")],
)
def test_large_v_prunes_compresses_saves_and_loads(tmp_path, pattern, score):
    model, cfg = _llama()
    config = VNMConfig(
        pattern, score=score, permute=score != "abs", permute_rounds=1, reconstruct=score == "obs", min_numel=0
    )
    stats = calibrate(model, _batches(), progress=False) if score == "ria" else None
    report = sparsify_(model, config, stats, data=_batches() if score == "obs" else None, progress=False)
    p = VNMPattern.parse(pattern)
    assert len(report.sparsified) == 14 and report["lm_head"].skipped == "ignored by name"
    for r in report.sparsified:
        state = get_sparsity(model.get_submodule(r.name))
        assert state.pattern == r.pattern == p
        assert is_vnm(state.mask, p, state.in_perm, state.out_perm)
        # n per row per M-group (a partial last group keeps n too); rows of a short last block keep theirs
        assert r.density == pytest.approx(p.n * math.ceil(r.shape[1] / p.m) / r.shape[1])
        assert 0 < r.importance_kept < 1
        assert r.permuted == (score != "abs")
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
        compress_(model, progress=False)
        assert {str(m.pattern) for m in compressed_linears(model).values()} == {pattern}
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)
        save_compressed(model, tmp_path)
        with torch.device("meta"):
            fresh = transformers.LlamaForCausalLM(cfg).eval()
        load_compressed(fresh, tmp_path)
        torch.testing.assert_close(fresh(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_large_v_compiled_matches_eager(pattern="256:2:8"):
    model, _ = _llama()
    sparsify_(model, VNMConfig(pattern, score="abs", permute=True, min_numel=0), progress=False)
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="vnm", options={"force_sparse": True, "inductor": False})
        torch.testing.assert_close(compiled(ids).logits, ref, rtol=1e-5, atol=1e-5)
    from vnm_compile.backend import last_report

    assert {str(layer.pattern) for layer in last_report().lowered} == {pattern}


def test_find_permutation_keeps_more_at_v256():
    from vnm_compile import find_permutation, vnm_mask

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(300, 203, generator=g) ** 4  # rows and columns not multiples of V or M
    p = VNMPattern.parse("256:2:8")
    in_perm, out_perm = find_permutation(scores, p)
    permuted = scores[out_perm][:, in_perm]
    assert sorted(in_perm.tolist()) == list(range(203)) and sorted(out_perm.tolist()) == list(range(300))
    assert (permuted * vnm_mask(permuted, p)).sum() > (scores * vnm_mask(scores, p)).sum()


@pytest.mark.parametrize("slug", sorted(tables.shipped_tables()))
def test_shipped_tables_answer_for_every_v(slug):
    """Every V (measured or not) gets a finite answer: the nearest measured pattern (M first, then V)."""
    table = json.loads(tables.shipped_table(slug).read_text())
    measured = {q for r in table["records"] for q in r.get("vnm_us", {})}
    for pattern in [*LARGE_V, "256:2:16", "96:2:6", "48:2:5", "2:4"]:
        p = VNMPattern.parse(pattern)
        for tokens in (1, 16, 2048, 8192):
            s = dispatch.sparse_speedup(table, 4096, 11008, p, tokens)
            assert s is not None and math.isfinite(s) and s > 0, (pattern, tokens, s)
        limit = dispatch.token_limit(table, 4096, 11008, p)
        assert limit is None or limit >= 0
        dispatch.tc_token_floor(table, 4096, 11008, p)  # None or a count: never raises
        dispatch.tc_decode_window(table, 4096, 11008, p)
        if not any(VNMPattern.parse(q).v > 64 for q in measured) and f"64:{p.n}:{p.m}" in measured:
            # a table without V > 64 (the H200's): a larger V reads the V = 64 timings at its M
            for tokens in (1, 2048):
                assert dispatch.sparse_speedup(table, 4096, 11008, p, tokens) == pytest.approx(
                    dispatch.sparse_speedup(table, 4096, 11008, VNMPattern(64, p.n, p.m), tokens)
                )


def test_measured_v128_is_read_where_the_table_has_it():
    table = json.loads(tables.shipped_table("nvidia-h100-80gb-hbm3").read_text())
    rec = next(r for r in table["records"] if "128:2:8" in r["vnm_us"])
    shape, tokens = (rec["out_features"], rec["in_features"]), rec["tokens"]
    got = dispatch.sparse_speedup(table, *shape, VNMPattern.parse("128:2:8"), tokens)
    points = [r for r in table["records"] if (r["out_features"], r["in_features"], r["tokens"]) == (*shape, tokens)]
    expected = [r["dense_us"] / r["vnm_us"]["128:2:8"] for r in points if "128:2:8" in r.get("vnm_us", {})][-1]
    assert got == pytest.approx(expected)


def test_vnm_select_with_large_v(tmp_path, capsys):
    from vnm_compile.cli import main

    path = tmp_path / "speedups.json"
    path.write_text(json.dumps({"64:2:5": 1.1, "64:2:8": 1.5, "128:2:5": 1.3, "128:2:8": 1.9, "256:2:8": 2.0}))
    assert main(["select", "--speedups", str(path), "--threshold", "1.25"]) == 0
    out = capsys.readouterr().out
    assert "pick: 128:2:5" in out and "256:2:8" in out  # 128:2:5: the only M = 5 fast enough
    assert main(["select", "--speedups", str(path), "--threshold", "1.95"]) == 0
    assert "pick: 256:2:8" in capsys.readouterr().out
