"""Training batches for recovery: texts grouped by token length so batches carry little padding."""

from __future__ import annotations

__all__ = ["length_bucketed_batches"]


def length_bucketed_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenized batches of texts of similar length, in length order (``recover_`` shuffles the batch order).

    On short, uneven texts (docstring paragraphs: 40 tokens on average, up to 128) this does about a third
    of the work of random batches padded to their longest text.
    """
    from ..models import tokenize

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    return [
        tokenize(tokenizer, [texts[i] for i in order[k : k + batch_size]], max_length)
        for k in range(0, len(order), batch_size)
    ]
