"""compress_ / decompress_: swap a model's sparsified linears between their masked dense form (recovery
training, export) and their compressed form (deployment: ``VNMLinear``, no dense weight, no mask)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..calibration.attention import AttentionLink
from ..linears import Conv1DLinear
from ..state import LinearSparsity, get_sparsity, set_sparsity, sparse_linears
from .linear import VNMLinear

__all__ = ["compress_", "decompress_", "compressed_linears", "memory_report", "share_storage_"]

log = logging.getLogger(__name__)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> list[str]:
    """Put ``new`` wherever ``old`` is a child (a module shared under several names everywhere)."""
    names = []
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is old:
                parent._modules[child_name] = new
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def _check_not_parametrized(name: str, module: nn.Module) -> None:
    if getattr(module, "parametrizations", None) is not None:
        raise ValueError(
            f"{name}: the weight is parametrized (recovery training still attached): finish recovery "
            "(vnm_compile.recovery) so the weight is a plain Parameter before compress_"
        )


@torch.no_grad()
def compress_(model: nn.Module, *, layout: str = "auto", progress: bool = True) -> nn.Module:
    """Replace every sparsified ``nn.Linear`` of ``model`` **in place** by a ``VNMLinear`` holding only its
    compressed weight (no dense weight, no mask). Returns ``model``.

    ``layout`` "auto" (default) lays each weight out for the sparse tensor cores where they run on its device
    (CUDA, fp16/bf16, n = 2, V a multiple of 64), else row-major; "rows" forces row-major; "tc" the sparse-tensor
    core packing (ValueError where it is unavailable); "tc-compact" that packing without the dense mma.sp
    GEMM's rows and k-step padding (fewer bytes; kernels/sparse_tc.pack_sparse_tc). Eager, ``torch.compile(model)`` and
    ``torch.compile(model, backend="vnm")`` run it; ``decompress_`` goes back.
    """
    from tqdm.auto import tqdm

    linears = sparse_linears(model)
    if not linears:
        raise ValueError("compress_: the model has no sparsified linears (run sparsify_ first)")
    for name, module in tqdm(linears.items(), desc="compress", disable=not progress, leave=False):
        _check_not_parametrized(name, module)
        if module.weight.device.type == "meta":
            raise ValueError(f"compress_: {name} is on the meta device; load its weights first")
        new = VNMLinear.from_linear(module, get_sparsity(module), layout=layout)
        new.from_conv1d = isinstance(module, Conv1DLinear)  # decompress_ gives it back (GPT-2 checkpoint layout)
        new.train(module.training)
        _replace(model, module, new)
    check_links(model)
    share_storage_(model)
    log.info("%s", memory_report(model).splitlines()[-1])
    return model


@torch.no_grad()
def decompress_(model: nn.Module, *, progress: bool = True) -> nn.Module:
    """Replace every ``VNMLinear`` of ``model`` **in place** by an ``nn.Linear`` holding the masked dense weight,
    with its V:N:M state recorded as ``sparsify_`` records it (mask, permutations, pattern), e.g. for recovery
    training or export. Returns ``model``."""
    from tqdm.auto import tqdm

    found = compressed_linears(model)
    if not found:
        raise ValueError("decompress_: the model has no compressed linears (VNMLinear)")
    for _name, module in tqdm(found.items(), desc="decompress", disable=not progress, leave=False):
        device = module.compressed_weight().device
        kind = Conv1DLinear if module.from_conv1d else nn.Linear  # a converted Conv1D keeps its state_dict layout
        linear = kind(module.in_features, module.out_features, bias=module.bias is not None,
                      device="meta", dtype=module.weight_dtype)  # fmt: skip
        linear.weight = nn.Parameter(module.to_dense().to(device))
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=module.bias.requires_grad)
        linear.train(module.training)
        in_perm = None if module.in_perm is None else module.in_perm.clone()
        out_perm = None if module.out_perm is None else module.out_perm.clone()
        links = None if module.perm_links is None else module.perm_links.clone()
        set_sparsity(linear, LinearSparsity(module.pattern, module.mask(), in_perm, out_perm, links=links))
        _replace(model, module, linear)
    return model


def check_links(model: nn.Module) -> None:
    """Every VNMLinear that reads its input in permuted order (``in_linked``) needs a producer that writes it
    so (``out_linked``, the same permutation), and the other way round: else the model would compute
    another function. Raises ValueError naming the first layer without its partner."""
    layers = compressed_linears(model)
    outs = [m.out_perm for m in layers.values() if m.out_linked]
    ins = [m.in_perm for m in layers.values() if m.in_linked]

    def paired(perm, others) -> bool:
        return any(o.shape == perm.shape and o.device == perm.device and torch.equal(o, perm) for o in others)

    def heads_paired(o_in: torch.Tensor, v_out: torch.Tensor) -> bool:
        """o_in is v_out repeated per kv head (joint attention permutations with grouped-query attention):
        AttentionLink.o_perm of v_out for some head size."""
        n = v_out.numel()
        if v_out.device != o_in.device or o_in.numel() % n or o_in.numel() == n:
            return False
        rep = o_in.numel() // n
        links = (AttentionLink("v", "o", d, n // d * rep, n // d) for d in range(1, n + 1) if n % d == 0)
        return any(torch.equal(link.o_perm(v_out).to(o_in.dtype), o_in) for link in links)

    for name, m in layers.items():
        if m.in_linked and not (paired(m.in_perm, outs) or any(heads_paired(m.in_perm, v) for v in outs)):
            raise ValueError(f"{name}: its input permutation is linked to a producer's output permutation "
                             "(joint permutations), but no compressed layer writes that order")  # fmt: skip
        if m.out_linked and not (paired(m.out_perm, ins) or any(heads_paired(o, m.out_perm) for o in ins)):
            raise ValueError(f"{name}: its output permutation is linked to a consumer's input permutation "
                             "(joint permutations), but no compressed layer reads that order")  # fmt: skip


def _storage_key(m: VNMLinear) -> tuple:
    first = m._weight_tensors()[0]
    return (m.layout, str(m.pattern), m.in_features, m.weight_dtype, first.device)


@torch.no_grad()
def share_storage_(model: nn.Module) -> int:
    """Lay the compressed weights of sibling candidates out in one storage **in place**: the VNMLinear
    children of one parent with the same layout, pattern, input width, dtype and device, in module order,
    become views into one tensor per weight key (rows concatenated; each weight's rows are padded to whole
    V blocks). q/k/v and gate/up then sit side by side, so the "vnm" backend runs linears that read one
    input as one launch on a view of that storage, without a copy. Returns the number of groups."""
    groups = 0
    for parent in model.modules():
        by_key: dict[tuple, list[VNMLinear]] = {}
        for child in parent.children():
            if isinstance(child, VNMLinear) and child._weight_tensors()[0].device.type != "meta":
                by_key.setdefault(_storage_key(child), []).append(child)
        for members in by_key.values():
            if len(members) < 2 or len({id(m) for m in members}) < len(members):
                continue
            keys = [entry[0] for entry in members[0]._buffer_shapes(members[0].layout)]
            for key in keys:
                fused = torch.cat([getattr(m, key) for m in members])
                row = 0
                for m in members:
                    rows = getattr(m, key).shape[0]
                    m._buffers[key] = fused[row : row + rows]
                    row += rows
            groups += 1
    return groups


def compressed_linears(model: nn.Module) -> dict[str, VNMLinear]:
    """Every VNMLinear of ``model`` once, under its first name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, VNMLinear)}


def _tensor_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes() if t.device.type != "meta" else t.numel() * t.element_size()
    return total


def memory_report(model: nn.Module) -> str:
    """A table of the bytes each compressed layer holds against its dense weight, and the model's total."""
    rows = compressed_linears(model)
    lines = [f"{'layer':<48} {'layout':>6} {'pattern':>9} {'MiB':>9} {'dense MiB':>10} {'ratio':>6}"]
    held = dense = 0
    for name, m in rows.items():
        held, dense = held + m.nbytes, dense + m.dense_nbytes
        lines.append(f"{name:<48} {m.layout:>6} {str(m.pattern):>9} {m.nbytes / 2**20:>9.2f} "
                     f"{m.dense_nbytes / 2**20:>10.2f} {m.nbytes / m.dense_nbytes:>6.3f}")  # fmt: skip
    total = _tensor_bytes(model)
    lines.append(
        f"{len(rows)} compressed linears hold {held / 2**20:.1f} MiB for {dense / 2**20:.1f} MiB of dense weights "
        f"({held / max(dense, 1):.3f}x); the whole model holds {total / 2**20:.1f} MiB "
        f"(dense: {(total - held + dense) / 2**20:.1f} MiB, {total / max(total - held + dense, 1):.3f}x)"
    )
    return "\n".join(lines)
