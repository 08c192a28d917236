"""Finding attention value/output pairs (v_proj -> o_proj) whose permutations can be chosen jointly.

Channel j of head h of the attention output is ``sum_t a_h(t) v_t[j]``: the value projection's output
channels reach the output projection's input channels one to one, mixed only over tokens. Permuting
v_proj's output channels by P and o_proj's input channels by the same P therefore leaves the function
unchanged when P keeps every channel inside its head (one permutation per head). With grouped-query attention
(``n_kv_heads < n_heads``) query head h reads kv head ``h // n_rep``: o_proj's input permutation is then each kv
head's permutation repeated for its n_rep query heads (``AttentionLink``). Moving whole heads would need q and
k to move the same way; it is never done.

Found in two steps, both needed:

1. Structure, read from the modules of known attention layouts: a module with ``v_proj`` and ``o_proj`` (or
   ``out_proj``) children and its head counts (``head_dim``, ``num_heads`` / ``config.num_attention_heads``,
   ``num_key_value_heads``; Llama, Mistral, Qwen2, OPT ...), or BERT/ViT's ``self``/``attention`` (``value``,
   ``num_attention_heads``, ``attention_head_size``) with ``output.dense``.
2. Proof on one example batch: with forward hooks, v_proj's output is permuted by a random per-head
   permutation and o_proj's input must come out permuted by the matching permutation (to rounding); and a
   permutation that swaps channels across kv heads must not (else the batch cannot tell heads apart, e.g. a
   single token; checked on the first pair of each attention class and head shape). Pairs that fail either
   keep independent permutations (logged at debug level). Cost: three forward passes of the batch when
   every pair passes, two or three per pair otherwise.

The compiled path does not trust these links: the backend's cancel_permutations pass proves the same
property on the FX graph before it drops an index op.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..linears import in_features_of, is_conv1d, is_linear_like

__all__ = ["AttentionLink", "find_attention_links"]

logger = logging.getLogger(__name__)

# (value child, output child) names of known attention modules, relative to the attention module
_PAIRS = (
    ("v_proj", "o_proj"),
    ("v_proj", "out_proj"),
    ("self.value", "output.dense"),
    ("attention.value", "output.dense"),
)
# relative tolerance of the proof (max abs difference over max abs value), per activation dtype
_TOL = {torch.float16: 2e-2, torch.bfloat16: 5e-2}
_DEFAULT_TOL = 1e-4


@dataclass(frozen=True)
class AttentionLink:
    """A value projection ``v`` (``n_kv_heads * head_dim`` outputs) read by the output projection ``o``
    (``n_heads * head_dim`` inputs) through attention: query head h reads kv head ``h // (n_heads // n_kv_heads)``."""

    v: str
    o: str
    head_dim: int
    n_heads: int
    n_kv_heads: int

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def segments(self) -> Tensor:
        """(n_kv_heads * head_dim,) kv head of each of v_proj's output channels (o_proj's base columns)."""
        return torch.arange(self.n_kv_heads * self.head_dim) // self.head_dim

    def ties(self) -> Tensor:
        """(n_rep, n_kv_heads * head_dim): o_proj's input column of copy r of kv channel (g, i), i.e. of query
        head ``g * n_rep + r`` (permutation.find_shared_permutation's ``in_ties``)."""
        d, rep = self.head_dim, self.n_rep
        kv = torch.arange(self.n_kv_heads * d)
        g, i = kv // d, kv % d
        return torch.stack([(g * rep + r) * d + i for r in range(rep)])

    def o_perm(self, v_perm: Tensor) -> Tensor:
        """o_proj's input permutation from v_proj's output permutation (each kv head's, repeated)."""
        ties = self.ties().to(v_perm.device)
        real = torch.empty(ties.numel(), dtype=torch.int64, device=v_perm.device)
        real[ties.flatten()] = ties[:, v_perm].flatten()
        return real

    def v_perm(self, o_perm: Tensor) -> Tensor | None:
        """v_proj's output permutation from o_proj's input permutation; None unless ``o_perm`` keeps every
        channel in its head and is the same for the n_rep query heads of each kv head."""
        d = self.head_dim
        if o_perm.shape != (self.n_heads * d,):
            return None
        heads = torch.arange(o_perm.numel(), device=o_perm.device) // d
        if not torch.equal(heads[o_perm], heads):
            return None
        first = self.ties()[0].to(o_perm.device)  # o columns of copy 0 = kv channels in order
        base = o_perm[first]  # o column each kv channel's copy-0 slot reads
        g = torch.arange(self.n_kv_heads * d, device=o_perm.device) // d
        v = g * d + base % d
        return v if torch.equal(self.o_perm(v), o_perm) else None


def _heads(module: nn.Module, v_out: int, o_in: int) -> tuple[int, int, int] | None:
    """(head_dim, n_heads, n_kv_heads) of an attention module from its attributes or config, checked
    against v_proj's outputs and o_proj's inputs; None if unknown or inconsistent."""
    cfg = getattr(module, "config", None)

    def first(*names):
        for owner in (module, cfg):
            for n in names:
                val = getattr(owner, n, None) if owner is not None else None
                if isinstance(val, int) and val > 0:
                    return val
        return None

    n_heads = first("num_heads", "num_attention_heads", "n_heads")
    d = first("head_dim", "attention_head_size")
    if d is None and n_heads:
        d = o_in // n_heads if o_in % n_heads == 0 else None
    if n_heads is None and d:
        n_heads = o_in // d if o_in % d == 0 else None
    groups = first("num_key_value_groups")
    n_kv = first("num_key_value_heads", "n_kv_heads")
    if n_kv is None and groups and n_heads and n_heads % groups == 0:
        n_kv = n_heads // groups
    n_kv = n_kv or n_heads
    if not (d and n_heads and n_kv) or n_heads % n_kv or n_kv * d != v_out or n_heads * d != o_in:
        return None
    return d, n_heads, n_kv


def _candidates(model: nn.Module, names: dict[int, str]) -> list[AttentionLink]:
    """Pairs from the module structure (step 1 of the module docstring)."""
    found = []
    for _, module in model.named_modules():
        for v_rel, o_rel in _PAIRS:
            v, o = _child(module, v_rel), _child(module, o_rel)
            if v is None or o is None or not (is_linear_like(v) and is_linear_like(o)):
                continue
            owner = _child(module, v_rel.rsplit(".", 1)[0]) if "." in v_rel else module
            heads = _heads(owner, _out_features(v), in_features_of(o))
            if heads is None or id(v) not in names or id(o) not in names:
                continue
            found.append(AttentionLink(names[id(v)], names[id(o)], *heads))
    return found


def _child(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = module._modules.get(part) if module is not None else None
    return module


def _out_features(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[1] if is_conv1d(module) else w.shape[0])


@contextlib.contextmanager
def _hooks(modules: dict[str, nn.Module], v_perms: dict[str, Tensor], seen: dict[str, Tensor]) -> Iterator[None]:
    """Permute the outputs of the v modules in ``v_perms``; record the inputs of every o module in ``seen``."""
    handles = []

    def permute(perm, _m, _args, out):
        return out.index_select(-1, perm.to(out.device)) if isinstance(out, Tensor) else out

    def record(name, _m, args):
        if args and isinstance(args[0], Tensor):
            seen[name] = args[0].detach().clone()

    try:
        for name, perm in v_perms.items():
            handles.append(modules[name].register_forward_hook(lambda m, a, o, p=perm: permute(p, m, a, o)))
        for name in seen:
            handles.append(modules[name].register_forward_pre_hook(lambda m, a, n=name: record(n, m, a)))
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model, batch, modules, links, v_perms) -> dict[str, Tensor | None]:
    from .observer import run_batch

    seen: dict[str, Tensor | None] = {link.o: None for link in links}
    with _hooks(modules, v_perms, seen):
        run_batch(model, batch)
    return seen


def _agrees(before: Tensor | None, after: Tensor | None, o_perm: Tensor) -> bool:
    """o_proj's input after permuting v is its input before, with columns permuted by ``o_perm``."""
    if before is None or after is None or before.shape != after.shape or before.dim() < 3 or before.shape[-2] < 2:
        return False
    ref = before.index_select(-1, o_perm.to(before.device)).double()
    tol = _TOL.get(before.dtype, _DEFAULT_TOL)
    return bool((after.double() - ref).abs().max() <= tol * ref.abs().max().clamp_min(1e-30))


def _prove(model, batch, modules, links, gen) -> list[AttentionLink]:
    """The links whose per-head permutation commutes with the model on ``batch`` and whose cross-head one
    does not (step 2 of the module docstring). All links are tried in one pass, then one by one."""

    def within(link):
        d = link.head_dim
        return torch.cat([g * d + torch.randperm(d, generator=gen) for g in range(link.n_kv_heads)])

    def across(link):  # swap channel 0 of kv head 0 with channel 0 of kv head 1 (None with one kv head)
        if link.n_kv_heads < 2:
            return None
        perm = torch.arange(link.n_kv_heads * link.head_dim)
        perm[0], perm[link.head_dim] = link.head_dim, 0
        return perm

    def kind(link):  # links of one attention class and head shape behave alike on the batch
        parent = link.v.rsplit(".", 1)[0] if "." in link.v else ""
        return (type(model.get_submodule(parent)), link.head_dim, link.n_heads, link.n_kv_heads)

    def check(group: list[AttentionLink]) -> bool:
        base = _run(model, batch, modules, group, {})
        perms = {link.v: within(link) for link in group}
        moved = _run(model, batch, modules, group, perms)
        if not all(_agrees(base[lk.o], moved[lk.o], lk.o_perm(perms[lk.v])) for lk in group):
            return False
        # the batch must tell the heads apart (one forward per kind: the first link of each)
        for lk in {kind(lk): lk for lk in reversed(group)}.values():
            cross = across(lk)
            if cross is not None:
                moved = _run(model, batch, modules, [lk], {lk.v: cross})
                if _agrees(base[lk.o], moved[lk.o], lk.o_perm(cross)):
                    return False
        return True

    if not links:
        return []
    if check(links):
        return links
    proven = [link for link in links if check([link])]
    for link in set(links) - set(proven):
        logger.debug("attention %s -> %s: head structure not proven on the example batch; independent "
                     "permutations", link.v, link.o)  # fmt: skip
    return proven


@torch.no_grad()
def find_attention_links(
    model: nn.Module, batch, *, filter_fn: Callable[[str, nn.Module], bool] | None = None, seed: int = 0
) -> list[AttentionLink]:
    """The (v_proj -> o_proj) pairs of ``model`` whose output/input permutations may be chosen jointly, per
    head (module docstring), proven on one example ``batch`` (as for calibrate: dict, tuple or tensor; at
    least two tokens per sequence)."""
    names: dict[int, str] = {}
    modules: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if is_linear_like(module) and (filter_fn is None or filter_fn(name, module)):
            names.setdefault(id(module), name)
            modules[name] = module
    candidates = _candidates(model, names)
    if not candidates:
        return []
    links = _prove(model, batch, modules, candidates, torch.Generator().manual_seed(seed))
    logger.info("found %d attention v/o pairs for joint permutations (of %d candidates)", len(links), len(candidates))
    return links
