"""passes/graph.py's constants: a pass adds buffers under PREFIX, names them afresh, and finish() drops the
ones nothing reads any more (never a buffer the model itself holds)."""

import torch
from torch import fx, nn

from vnm_compile.passes.graph import PREFIX, constant, finish, fresh_prefix


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.full((4,), 2.0))

    def forward(self, x):
        return x * self.scale


def test_constants_are_named_afresh_and_unread_ones_dropped():
    gm = fx.symbolic_trace(_Model())
    assert fresh_prefix(gm) == 0
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        read = constant(gm, graph, f"{PREFIX}0_add", torch.arange(4.0))
        unread = constant(gm, graph, f"{PREFIX}0_spare", torch.ones(4))
        total = graph.call_function(torch.add, (out.args[0], read))
    out.args = (total,)
    assert fresh_prefix(gm) == 1  # _vnm0_ is taken now
    assert unread.target in dict(gm.named_buffers())
    finish(gm)
    names = dict(gm.named_buffers())
    assert f"{PREFIX}0_add" in names and "scale" in names and f"{PREFIX}0_spare" not in names
    assert all(n.target != f"{PREFIX}0_spare" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(torch.ones(4)), torch.full((4,), 2.0) + torch.arange(4.0))
