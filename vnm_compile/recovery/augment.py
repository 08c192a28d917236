"""Augmented distillation batches: new inputs for the teacher to label, made on the fly from the training text.

Distillation needs no labels: the dense teacher labels any input, so recovery can train on variations of
its few training texts rather than revisiting the same ones for many epochs (TinyBERT's data augmentation,
Jiao et al. 2020, section 3.2, replaces words by GloVe neighbours and BERT predictions; here three cheap
token-level edits stand in for it). Each row of a tokenized batch is read as leading special tokens
(``[CLS]``), content, trailing special tokens (``[SEP]``) and padding; only the content changes:

1. crop: a random contiguous window of the content (at least ``min_crop`` of it);
2. concat: a window of another paragraph's content joined before or after it (cut to ``max_length``);
3. replace: each content token is replaced, with probability ``replace``, by a token drawn from the
   training batches' content tokens (their unigram distribution: ordinary words, not unused vocabulary).

Batches are single-segment (``token_type_ids`` all zero), as ``length_bucketed_batches`` makes them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["AugmentConfig", "AugmentedBatches"]

_KEYS = {"input_ids", "attention_mask", "token_type_ids"}


@dataclass(frozen=True)
class AugmentConfig:
    """How batches are augmented (all off: the batches pass unchanged, in a shuffled order).

    Args:
        replace: probability that a content token is replaced by a random content token of the training set.
        crop: probability that a row is cut to a random contiguous window of its content.
        concat: probability that a window of another paragraph is joined to a row.
        min_crop: the shortest window, as a fraction of the content (crop and concat).
    """

    replace: float = 0.15
    crop: float = 0.0
    concat: float = 0.0
    min_crop: float = 0.5

    def __post_init__(self) -> None:
        for name in ("replace", "crop", "concat"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"AugmentConfig.min_crop must be in (0, 1], got {self.min_crop}")


def _split(ids: list[int], special: set[int]) -> tuple[list[int], list[int], list[int]]:
    """(leading specials, content, trailing specials) of one row's attended tokens."""
    i, j = 0, len(ids)
    while i < j and ids[i] in special:
        i += 1
    while j > i and ids[j - 1] in special:
        j -= 1
    return ids[:i], ids[i:j], ids[j:]


class AugmentedBatches:
    """An endless, seeded stream of augmented copies of tokenized batches, for ``recover_``'s ``data``.

    Every pass over the stream is the same (seeded), so ``recover_`` resumes it exactly. The batches are
    visited in a fresh order every epoch (``recover_`` cannot shuffle an iterable); every batch is a new
    variation, so a distillation loss must not cache the teacher's outputs per batch
    (``DistillLoss(cache=False)``).

    Args:
        batches: dicts of ``input_ids``, ``attention_mask`` (and ``token_type_ids``), right-padded.
        config: what to change.
        special_ids: the tokenizer's special tokens (``tokenizer.all_special_ids``): never replaced or moved.
        pad_id: the padding token (``tokenizer.pad_token_id``).
        max_length: the longest row a concatenation may make (default: the widest batch).
        seed: seeds the order and the edits.

    Yields batches on the device of ``batches``, as wide as their longest row.
    """

    def __init__(
        self,
        batches: Sequence[dict],
        config: AugmentConfig,
        *,
        special_ids: Iterable[int],
        pad_id: int,
        max_length: int | None = None,
        seed: int = 0,
    ) -> None:
        if not batches:
            raise ValueError("AugmentedBatches got no batches")
        for b in batches:
            if not {"input_ids", "attention_mask"} <= set(b) or set(b) - _KEYS:
                raise ValueError(f"batches must hold input_ids, attention_mask (and token_type_ids), got {sorted(b)}")
            if "token_type_ids" in b and b["token_type_ids"].any():
                raise ValueError("AugmentedBatches takes single-segment batches (token_type_ids all zero)")
        self.config, self.pad_id, self.seed = config, pad_id, seed
        self.special = set(special_ids)
        self.device = batches[0]["input_ids"].device
        self.max_length = max_length or max(b["input_ids"].shape[1] for b in batches)
        # Rows as (head, content, tail) lists of ids, per batch; the pool of content tokens to draw from.
        self.rows = [
            [
                _split(ids[:n], self.special)
                for ids, n in zip(b["input_ids"].tolist(), b["attention_mask"].sum(1).tolist(), strict=True)
            ]
            for b in batches
        ]
        self.flat = [r for rows in self.rows for r in rows if r[1]]
        self.pool = torch.tensor([t for _, content, _ in self.flat for t in content], dtype=torch.long)
        if not len(self.pool):
            raise ValueError("AugmentedBatches: the batches hold no content tokens (only special tokens)")
        self.token_types = "token_type_ids" in batches[0]

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        epoch = 0
        while True:
            order = torch.randperm(
                len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            )
            for i in order.tolist():
                yield self._augment(self.rows[i], rng, g)
            epoch += 1

    def _window(self, content: list[int], rng: random.Random) -> list[int]:
        n = rng.randint(max(1, round(self.config.min_crop * len(content))), len(content))
        start = rng.randint(0, len(content) - n)
        return content[start : start + n]

    def _augment(self, rows: list[tuple[list[int], list[int], list[int]]], rng: random.Random, g: torch.Generator):
        """One augmented batch of ``rows`` (head, content, tail): steps 1-3 of the module docstring."""
        c = self.config
        out = []
        for head, content, tail in rows:
            if content and rng.random() < c.crop:
                content = self._window(content, rng)
            if rng.random() < c.concat:
                other = self._window(self.flat[rng.randrange(len(self.flat))][1], rng)
                content = content + other if rng.random() < 0.5 else other + content
                content = content[: max(0, self.max_length - len(head) - len(tail))]
            out.append((head, content, tail))
        width = max(len(h) + len(x) + len(t) for h, x, t in out)
        ids = torch.full((len(out), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(out), width), dtype=torch.long)
        is_content = torch.zeros((len(out), width), dtype=torch.bool)
        for r, (head, content, tail) in enumerate(out):
            row = head + content + tail
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[r, : len(row)] = 1
            is_content[r, len(head) : len(head) + len(content)] = True
        if c.replace:
            hit = is_content & (torch.rand(ids.shape, generator=g) < c.replace)
            ids[hit] = self.pool[torch.randint(len(self.pool), (int(hit.sum()),), generator=g)]
        batch = {"input_ids": ids, "attention_mask": attention}
        if self.token_types:
            batch["token_type_ids"] = torch.zeros_like(ids)
        return {k: v.to(self.device) for k, v in batch.items()}
