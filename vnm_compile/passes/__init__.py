"""FX passes of the "vnm" torch.compile backend, in the order they run.

Each pass is ``pass_(gm, ctx) -> bool`` (True when it changed the graph) and
reads/writes the shared CompileContext (options, linear sites, report).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import fx

from .cancel_permutations import cancel_permutations
from .context import CompileContext, CompileOptions, CompileReport, LayerCompileReport, LinearSite
from .expand_weights import expand_weights
from .find_linears import find_linears
from .fold_permutations import fold_permutations, permutation_nodes
from .fuse_compressed import fuse_compressed
from .fuse_siblings import fuse_siblings
from .interleave_rows import interleave_rows
from .keep_dense_off_gpu import keep_dense_off_gpu
from .lower_linears import lower_linears
from .prune_linears import prune_linears
from .sparse_tc_weights import sparse_tc_weights
from .store_permutations import fold_in_permutations, store_out_permutations

__all__ = [
    "PASSES",
    "run_passes",
    "find_linears",
    "prune_linears",
    "keep_dense_off_gpu",
    "fold_permutations",
    "lower_linears",
    "cancel_permutations",
    "fuse_siblings",
    "fuse_compressed",
    "expand_weights",
    "interleave_rows",
    "sparse_tc_weights",
    "store_out_permutations",
    "fold_in_permutations",
    "permutation_nodes",
    "CompileContext",
    "CompileOptions",
    "CompileReport",
    "LayerCompileReport",
    "LinearSite",
]

logger = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule, CompileContext], bool]

# 1. find linears and decide which can be lowered; 2. prune those without recorded state;
# 3. off the GPU (no fast kernels), keep them dense on their masked weights unless forced;
# 4. compress with permutations folded in (or held permuted); 5. rewrite to vnm.linear (or index ops around
# vnm::compressed_linear); 5b. cancel an output index op against the next layer's input one across
# element-wise ops (joint permutations); 6. one launch for siblings
# that read the same input (q/k/v, gate/up); 7. with the expand_weights option, the expanded
# weights for the gather GEMM; 8. with the interleave_rows option, the decode kernel's layout;
# 9. with the sparse_tensor_cores option (default "auto": on a GPU where they run), the mma.sp
# kernels' packed weights; 10. in a decode-only graph, vnm::compressed_linear's output permutations in its
# kernels' store instead of an index op; 11. one launch for sibling vnm::compressed_linear calls; 12. in a
# graph of at most 4 tokens per call, their input permutations in the kernels' column indices instead of an index op.
PASSES: list[Pass] = [
    find_linears,
    prune_linears,
    keep_dense_off_gpu,
    fold_permutations,
    lower_linears,
    cancel_permutations,
    fuse_siblings,
    expand_weights,
    interleave_rows,
    sparse_tc_weights,
    store_out_permutations,
    fuse_compressed,
    fold_in_permutations,
]


def run_passes(gm: fx.GraphModule, ctx: CompileContext, passes: list[Pass] | None = None) -> bool:
    """Run ``passes`` (default PASSES) in order; True if any changed the graph."""
    changed = False
    for p in PASSES if passes is None else passes:
        changed |= bool(p(gm, ctx))
    return changed
