import torch
from torch import nn

from vnm_compile import LinearSparsity, VNMPattern, vnm_mask
from vnm_compile.passes import fold_permutations, lower_linears, permutation_nodes, prune_linears
from vnm_compile.state import set_sparsity


def permuted_sparsify_(module: nn.Linear, pattern: str, seed: int) -> LinearSparsity:
    """Record a V:N:M state that holds only under random input/output permutations (as the permutation search gives)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = module.weight.shape
    in_perm, out_perm = torch.randperm(cols, generator=g), torch.randperm(rows, generator=g)
    scores = module.weight.detach().abs()
    mask_p = vnm_mask(scores[out_perm][:, in_perm], pattern)
    mask = torch.empty_like(mask_p)
    mask[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = mask_p
    with torch.no_grad():
        module.weight.mul_(mask)
    state = LinearSparsity(VNMPattern.parse(pattern), mask, in_perm, out_perm, "abs")
    set_sparsity(module, state)
    return state


def test_permutations_fold_into_indices_and_row_store(h, toy):
    up = permuted_sparsify_(toy.up, "16:2:5", 0)
    down = permuted_sparsify_(toy.down, "16:2:5", 1)
    x = torch.randn(2, 9, 48)
    with torch.no_grad():
        expected = toy(x)
    gm, inputs = h.capture(toy, x)
    ctx = h.context(gm, inputs, min_numel=0, permutations="fold")
    prune_linears(gm, ctx)
    assert fold_permutations(gm, ctx) is False  # builds weights only
    sites = {s.name: s for s in ctx.sites}
    for name, state in (("up", up), ("down", down)):
        w = sites[name].compressed
        assert w.row_index is not None  # out_perm -> row store
        assert torch.equal(w.to_dense(), sites[name].weight * state.mask)  # original order
        # in_perm -> absolute input columns: block 0's columns are permuted inputs, not 0..4
        assert set(w.columns[0, 0].tolist()) <= set(state.in_perm[:5].tolist())
    nodes_before = len(gm.graph.nodes)
    lower_linears(gm, ctx)
    assert permutation_nodes(gm) == []
    # only get_attr nodes for the compressed tensors were added: no op reorders channels
    added = len(gm.graph.nodes) - nodes_before
    assert added == 4 + 4  # values, columns, meta, row_index for each of the two layers
    got = gm(*inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_permutation_nodes_detects_index_ops(h):
    class Perm(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("perm", torch.randperm(16))

        def forward(self, x):
            return torch.index_select(x, -1, self.perm) + x[..., self.perm] + x.permute(1, 0).sum()

    gm, _ = h.capture(Perm(), torch.randn(4, 16))
    assert len(permutation_nodes(gm)) == 2  # index_select and x[..., perm]; transposes are not channel permutations


def test_compression_is_cached_per_weight_version(h, toy):
    gm, inputs = h.capture(toy, torch.randn(2, 48))
    ctx = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[])
    prune_linears(gm, ctx)
    fold_permutations(gm, ctx)
    ctx2 = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[])
    prune_linears(gm, ctx2)
    fold_permutations(gm, ctx2)
    assert all(a.compressed is b.compressed for a, b in zip(ctx.sites, ctx2.sites, strict=True))
    with torch.no_grad():
        toy.up.weight.add_(1.0)  # a changed weight is pruned and compressed again
    ctx3 = h.context(gm, inputs, pattern="16:2:5", min_numel=0, ignore=[])
    prune_linears(gm, ctx3)
    fold_permutations(gm, ctx3)
    assert ctx3.sites[0].compressed is not ctx.sites[0].compressed
    assert ctx3.sites[1].compressed is ctx.sites[1].compressed
