"""Augmented distillation batches: new inputs for the teacher to label, made on the fly from the training text.

Distillation needs no labels: the dense teacher labels any input, so recovery can train on variations of
its few training texts rather than revisiting the same ones for many epochs (TinyBERT's data augmentation,
Jiao et al. 2020, section 3.2, replaces words by GloVe neighbours and BERT predictions; here three cheap
token-level edits stand in for it). Each row of a tokenized batch is read as leading special tokens
(``[CLS]``), content, trailing special tokens (``[SEP]``) and padding; only the content changes:

1. crop: the content becomes a random contiguous window of itself (at least ``min_crop`` of it);
2. mix: part of it (at most ``1 - min_crop``) becomes a window of another training paragraph, joined
   before or after the rest, so the row mixes two contexts at no more than its own length;
3. replace: each content token is replaced, with probability ``replace``, by a token drawn from the
   training batches' content tokens (their unigram distribution: ordinary words, not unused vocabulary).

No row grows, so a batch stays as narrow as ``length_bucketed_batches`` made it (the work per step stays
that of the plain batch). Batches are single-segment (``token_type_ids`` all zero) and right-padded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AugmentConfig", "AugmentedBatches"]

_KEYS = {"input_ids", "attention_mask", "token_type_ids"}


@dataclass(frozen=True)
class AugmentConfig:
    """How batches are augmented (all 0: the batches pass unchanged, in a fresh order every epoch).

    Args:
        replace: probability that a content token is replaced by a random content token of the training set.
        crop: probability that a row's content is cut to a random contiguous window of it.
        mix: probability that part of a row's content is a window of another paragraph instead.
        min_crop: the shortest window a crop keeps, and the least of its own content a mixed row keeps.
    """

    replace: float = 0.15
    crop: float = 0.0
    mix: float = 0.0
    min_crop: float = 0.5

    def __post_init__(self) -> None:
        for name in ("replace", "crop", "mix"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"AugmentConfig.min_crop must be in (0, 1], got {self.min_crop}")


def _frame(ids: Tensor, attention_mask: Tensor, special: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: leading special tokens, attended length, trailing special tokens (right-padded rows)."""
    length = attention_mask.sum(1)
    is_special = torch.isin(ids, special) | (attention_mask == 0)
    head = torch.cumprod(is_special.long(), 1).sum(1).minimum(length)
    # Trailing specials: specials counted back from the last attended token (padding counts as special).
    tail = torch.cumprod(is_special.flip(1).long(), 1).sum(1) - (ids.shape[1] - length)
    return head, length, tail.minimum(length - head)


def _randint(low: Tensor, high: Tensor, g: torch.Generator) -> Tensor:
    """One uniform integer in [low, high] per element (high >= low)."""
    return low + (torch.rand(low.shape, generator=g) * (high - low + 1)).long().minimum(high - low)


class AugmentedBatches:
    """An endless, seeded stream of augmented copies of tokenized batches, for ``recover_``'s ``data``.

    Every pass over the stream is the same (seeded), so ``recover_`` resumes it exactly. The batches are
    visited in a fresh order every epoch (``recover_`` cannot shuffle an iterable); every batch is a new
    variation, so a distillation loss must not cache the teacher's outputs per batch
    (``DistillLoss(cache=False)``).

    Args:
        batches: dicts of ``input_ids``, ``attention_mask`` (and ``token_type_ids``), right-padded.
        config: what to change.
        special_ids: the tokenizer's special tokens (``tokenizer.all_special_ids``): those leading and
            trailing a row are never replaced or moved.
        pad_id: the padding token (``tokenizer.pad_token_id``).
        seed: seeds the order and the edits.

    Yields batches on the device of ``batches``, as wide as their longest row (at most the plain batch's width).
    """

    def __init__(
        self, batches: Sequence[dict], config: AugmentConfig, *, special_ids: Iterable[int], pad_id: int, seed: int = 0
    ) -> None:
        if not batches:
            raise ValueError("AugmentedBatches got no batches")
        for b in batches:
            if not {"input_ids", "attention_mask"} <= set(b) or set(b) - _KEYS:
                raise ValueError(f"batches must hold input_ids, attention_mask (and token_type_ids), got {sorted(b)}")
            if not torch.equal(b["attention_mask"].cummin(1).values, b["attention_mask"]):
                raise ValueError("AugmentedBatches takes right-padded batches (tokenizer.padding_side='right')")
            if "token_type_ids" in b and b["token_type_ids"].any():
                raise ValueError("AugmentedBatches takes single-segment batches (token_type_ids all zero)")
        self.config, self.pad_id, self.seed = config, pad_id, seed
        self.device = batches[0]["input_ids"].device
        self.token_types = "token_type_ids" in batches[0]
        # 1. Every row of every batch in one padded table, with its frame; batch i is rows[i].
        width = max(b["input_ids"].shape[1] for b in batches)

        def table(key: str) -> Tensor:  # every batch's ``key`` on the CPU, right-padded with 0 to ``width``
            return torch.cat([torch.nn.functional.pad(b[key].cpu(), (0, width - b[key].shape[1])) for b in batches])

        self.table, attention = table("input_ids"), table("attention_mask")
        self.head, self.length, self.tail = _frame(self.table, attention, torch.tensor(sorted(set(special_ids))))
        self.content = self.length - self.head - self.tail
        sizes = [b["input_ids"].shape[0] for b in batches]
        self.rows = torch.arange(len(self.table)).split(sizes)
        # 2. The pool replacements come from: every content token.
        pos = torch.arange(width)
        is_content = (pos >= self.head[:, None]) & (pos < (self.head + self.content)[:, None])
        self.pool = self.table[is_content]
        if not len(self.pool):
            raise ValueError("AugmentedBatches: the batches hold no content tokens (only special tokens)")
        self.partners = torch.nonzero(self.content > 0).flatten()  # rows a mix can draw from

    def __iter__(self) -> Iterator[dict]:
        g = torch.Generator().manual_seed(self.seed)
        epoch = 0
        while True:
            order = torch.randperm(
                len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            )
            for i in order.tolist():
                yield self._augment(i, g)
            epoch += 1

    def _augment(self, i: int, g: torch.Generator) -> dict:
        """Batch ``i`` edited (steps 1-3 of the module docstring), all rows at once."""
        c, rows = self.config, self.rows[i]
        n_rows = len(rows)
        head, tail, content = self.head[rows], self.tail[rows], self.content[rows]

        def least(n: Tensor) -> Tensor:  # the shortest window kept of n tokens
            return torch.ceil(c.min_crop * n).long().clamp_min(1).minimum(n)

        # 1. Crop: the content's new length n.
        cropped = torch.rand(n_rows, generator=g) < c.crop
        n = torch.where(cropped, _randint(least(content), content, g), content)
        # 2. Mix: k tokens of its own, m of a partner's; the own window first or last.
        mixed = torch.rand(n_rows, generator=g) < c.mix
        k = torch.where(mixed, _randint(least(n), n, g), n)
        partner = self.partners[torch.randint(len(self.partners), (n_rows,), generator=g)]
        m = torch.where(mixed, (n - k).minimum(self.content[partner]), 0)
        own_start = head + _randint(torch.zeros_like(k), content - k, g)
        partner_start = self.head[partner] + _randint(torch.zeros_like(m), self.content[partner] - m, g)
        own_first = ~mixed | (torch.rand(n_rows, generator=g) < 0.5)
        # 3. Gather: head | first window | second window | tail | padding, as (row, column) of the table.
        len1, len2 = torch.where(own_first, k, m), torch.where(own_first, m, k)
        row1, row2 = torch.where(own_first, rows, partner), torch.where(own_first, partner, rows)
        start1, start2 = (
            torch.where(own_first, own_start, partner_start),
            torch.where(own_first, partner_start, own_start),
        )
        e1 = head + len1
        e2 = e1 + len2
        end = e2 + tail
        q = torch.arange(int(end.max()))[None, :]
        col = torch.where(q < head[:, None], q, 0)
        col = torch.where((q >= head[:, None]) & (q < e1[:, None]), start1[:, None] + q - head[:, None], col)
        col = torch.where((q >= e1[:, None]) & (q < e2[:, None]), start2[:, None] + q - e1[:, None], col)
        col = torch.where(q >= e2[:, None], (self.length[rows] - tail)[:, None] + q - e2[:, None], col)
        row = torch.where((q >= e1[:, None]) & (q < e2[:, None]), row2[:, None], rows[:, None])
        row = torch.where((q >= head[:, None]) & (q < e1[:, None]), row1[:, None], row)
        attention = (q < end[:, None]).long()
        ids = torch.where(attention.bool(), self.table[row, col.clamp(0, self.table.shape[1] - 1)], self.pad_id)
        # 4. Replace content tokens.
        if c.replace:
            hit = (q >= head[:, None]) & (q < e2[:, None]) & (torch.rand(ids.shape, generator=g) < c.replace)
            ids[hit] = self.pool[torch.randint(len(self.pool), (int(hit.sum()),), generator=g)]
        batch = {"input_ids": ids, "attention_mask": attention}
        if self.token_types:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return {k: v.to(self.device) for k, v in batch.items()}
