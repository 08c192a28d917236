"""Helpers of the pass tests: Dynamo-captured toy graphs and eager sparsified references.

Kept out of conftest.py: the test folders' conftest modules all import as ``conftest``, and a Dynamo guard
on a global of a function defined in one (``torch``) was looked up in whichever was imported last
(``module 'conftest' has no attribute 'torch'`` when tests/kernels ran after tests/passes).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

import vnm_compile  # noqa: F401  (registers the backend, the op's autograd)
from vnm_compile import VNMConfig, sparsify_
from vnm_compile.kernels.vnm_linear import OP
from vnm_compile.passes import CompileContext, CompileOptions, find_linears


class Toy(nn.Module):
    """LayerNorm -> up (48 -> 80, awkward for M = 5 and V = 16) -> relu -> down (80 -> 40, no bias),
    plus a tiny linear, an ignorable head and a weight shared by two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(48)
        self.up = nn.Linear(48, 80)
        self.down = nn.Linear(80, 40, bias=False)
        self.tiny = nn.Linear(40, 8)
        self.head = nn.Linear(40, 40)
        self.shared = nn.Linear(40, 40)

    def forward(self, x):
        h = self.down(torch.relu(self.up(self.ln(x))))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h), self.tiny(h)


def capture(model: nn.Module, *args, dynamic: bool | None = False):
    """The GraphModule and example inputs Dynamo hands to a backend for ``model(*args)``."""
    got = {}

    def backend(gm, example_inputs):
        got.setdefault("gm", gm)
        got.setdefault("inputs", list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic)(*args)
    return got["gm"], got["inputs"]


def context(gm, inputs, **options) -> CompileContext:
    # the passes are tested on CPU graphs: lower as on a GPU (off CUDA layers stay dense unless forced)
    ctx = CompileContext(CompileOptions.from_dict({"force_sparse": True, **options}), inputs)
    find_linears(gm, ctx)
    return ctx


def count_op(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def count_vnm(gm) -> int:
    return count_op(gm, OP)


def count_linear(gm) -> int:
    targets = {torch._C._nn.linear, F.linear, torch.ops.aten.linear.default}
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def abs_sparsified(model: nn.Module, pattern: str, ignore=(), min_numel: int = 0) -> nn.Module:
    """A deep copy of ``model`` pruned in eager mode as the backend prunes at compile time (ABS, no permutation)."""
    ref = copy.deepcopy(model)
    sparsify_(
        ref, VNMConfig(pattern, score="abs", permute=False, ignore=tuple(ignore), min_numel=min_numel), progress=False
    )
    return ref
