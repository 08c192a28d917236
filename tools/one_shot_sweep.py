"""One-shot MiniLM pruning rows for choosing second-order settings without touching the held-out set.

``--split val`` (the default, for tuning) calibrates on the calibration
modules minus ``VALIDATION_MODULES`` and measures the `vnm demo` metric (mean
embedding cosine to the dense model) on paragraphs of those modules only: the
evaluation modules of ``vnm demo`` are never read. ``--split test`` measures a
setting on `vnm demo`'s own split (calibration paragraphs, held-out
paragraphs), for reporting a choice made on ``val``.

    python tools/one_shot_sweep.py --pattern 64:2:5 --permute --set damp=0.01 --set damp=0.05

Each ``--set`` is one row: comma-separated VNMConfig fields (``damp=0.05,reconstruct_method=exact``),
plus ``calibration=N`` (paragraphs) which is not a VNMConfig field.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.data import CALIBRATION_MODULES, calibration_and_eval_texts, docstring_texts
from vnm_compile.models import embed, load_minilm, text_batches

VALIDATION_MODULES = ("socket", "tarfile", "unittest.case")


def _texts(split: str, n_calibration: int | None, n_eval: int) -> tuple[list[str], list[str]]:
    if split == "test":
        return calibration_and_eval_texts(n_calibration, n_eval)
    val = docstring_texts(VALIDATION_MODULES)
    seen = set(val)
    calib = [t for t in docstring_texts(tuple(m for m in CALIBRATION_MODULES if m not in VALIDATION_MODULES))
             if t not in seen]  # fmt: skip
    return calib[:n_calibration], val[:n_eval]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="64:2:5")
    ap.add_argument("--permute", action="store_true")
    ap.add_argument("--score", default="obs")
    ap.add_argument("--split", choices=("val", "test"), default="val")
    ap.add_argument("--calibration", type=int, default=256, help="calibration paragraphs (default 256, as vnm demo)")
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="one row: field=value,field=value")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_minilm()
    cache: dict[int | None, tuple[list, list]] = {}
    rows = args.set or [""]
    print(f"split={args.split} pattern={args.pattern} permute={args.permute} score={args.score}")
    for row in rows:
        fields = dict(kv.split("=", 1) for kv in row.split(",") if kv)
        fields = {k: _value(v) for k, v in fields.items()}
        n_cal = fields.pop("calibration", args.calibration)
        n_cal = None if n_cal in (0, "all") else int(n_cal)
        if n_cal not in cache:
            calib_texts, eval_texts = _texts(args.split, n_cal, args.eval)
            calib, held = text_batches(tok, calib_texts), text_batches(tok, eval_texts)
            cache[n_cal] = (calib, held, embed(model, held))
        calib, held, dense = cache[n_cal]
        config = VNMConfig(args.pattern, score=args.score, permute=args.permute, reconstruct=True, **fields)
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        report = sparsify_(pruned, config, data=calib, progress=False)
        seconds = time.perf_counter() - start
        cos = float((embed(pruned, held) * dense).sum(-1).mean())
        errs = [r.error for r in report.sparsified if r.error is not None]
        tokens = sum(int(b["attention_mask"].sum()) for b in calib)
        print(f"{row or 'default':<60} calib_tokens={tokens:>6} cosine={cos:.4f} "
              f"mean_layer_err={sum(errs) / len(errs):.4f} time={seconds:.1f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
