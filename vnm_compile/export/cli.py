"""`vnm export onnx|tensorrt`: sparsify the bundled MiniLM (or a transformers model directory, ``--model``)
and export it; `vnm export onnx --compressed DIR` exports a compressed checkpoint (``save_compressed``)
as it is.

Heavy imports (transformers, onnx, tensorrt) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_export_parser"]


def _load_model_dir(path: Path):
    """(model, tokenizer) of a transformers model directory (config, weights and tokenizer files), offline."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token is None:  # causal LMs ship without one; batches of several texts need it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _prepare_minilm(args: argparse.Namespace):
    """(sparsified model, export example batch, held-out check batch, report): the bundled MiniLM, or the
    transformers model directory ``args.model``."""
    from ..calibration import calibrate
    from ..data import calibration_and_eval_texts
    from ..models import load_minilm, text_batches
    from ..sparsify import VNMConfig, sparsify_

    model, tokenizer = load_minilm() if getattr(args, "model", None) is None else _load_model_dir(args.model)
    calib_texts, eval_texts = calibration_and_eval_texts(args.calibration, 8)
    stats = None
    if args.score != "abs":
        stats = calibrate(model, text_batches(tokenizer, calib_texts), progress=not args.no_progress)
    config = VNMConfig(args.pattern, score=args.score, permute=args.permute)
    report = sparsify_(model, config, stats, progress=not args.no_progress)
    example = text_batches(tokenizer, eval_texts[:2])[0]
    check = text_batches(tokenizer, eval_texts[2:8], batch_size=6)[0]
    if "token_type_ids" in example and "token_type_ids" not in _forward_args(model):
        example.pop("token_type_ids")
        check.pop("token_type_ids")
    return model, example, check, report


def _forward_args(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _check_model_dir(path: Path | None) -> str | None:
    """Why ``--model`` cannot be loaded (before any slow step), or None."""
    if path is None:
        return None
    if not path.is_dir():
        return f"--model {path}: not a directory (give a transformers model directory: config.json, weights, tokenizer)"
    if not (path / "config.json").is_file():
        return f"--model {path}: no config.json (save the model with save_pretrained, tokenizer included)"
    return None


def _check_compressed_dir(path: Path) -> str | None:
    """Why ``--compressed`` cannot be exported (before any slow step), or None."""
    from ..deploy.checkpoint import INDEX_NAME

    if not path.is_dir() or not (path / INDEX_NAME).is_file():
        return f"--compressed {path}: not a save_compressed folder (no {INDEX_NAME})"
    if not (path / "config.json").is_file():
        return (f"--compressed {path}: no config.json (save_compressed writes it for transformers models; "
                "for another model, load_compressed it and call vnm_compile.export.to_onnx from Python)")  # fmt: skip
    return None


def _prepare_compressed(path: Path):
    """(compressed model, export example batch, check batch): the transformers model of a save_compressed
    folder (config.json's ``architectures``), built on the meta device and filled by load_compressed on the
    CPU (nothing dense is materialised); random token ids as inputs."""
    import torch
    import transformers

    from ..deploy import load_compressed

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise ValueError(f"--compressed {path}: config.json names no transformers model class ({arch!r})")
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ValueError(f"--compressed {path}: {arch} takes no token ids (no vocab_size): use to_onnx from Python")
    with torch.device("meta"):
        model = cls(config)
    load_compressed(model, path, device="cpu")
    model.eval()
    gen = torch.Generator().manual_seed(0)

    def batch(rows: int, tokens: int) -> dict:
        ids = torch.randint(0, vocab, (rows, tokens), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return model, batch(2, 8), batch(3, 11)


def _export_compressed_onnx(args: argparse.Namespace) -> int:
    problem = _check_compressed_dir(args.compressed)
    if problem:
        print(f"vnm export onnx: {problem}", file=sys.stderr)
        return 2
    try:
        model, example, check = _prepare_compressed(args.compressed)
    except ValueError as e:
        print(f"vnm export onnx: {e}", file=sys.stderr)
        return 2
    ckpt = sum(f.stat().st_size for f in args.compressed.glob("*.safetensors"))
    return _write_and_check(args, model, example, check, ("compressed checkpoint", ckpt), "3 random token sequences")


def _write_and_check(args, model, example, check, source: tuple[str, int], inputs: str) -> int:
    """Export, print what the file holds beside ``source`` (label, bytes), and run it in onnxruntime."""
    from .onnx import onnx_summary, to_onnx

    path = to_onnx(model, example, args.out, opset=args.opset)
    summary = onnx_summary(path)
    print(f"{'file':<34} {str(path)}")
    print(f"{'VNMLinear nodes':<34} {summary['vnm_nodes']}")
    print(f"{'file size':<34} {summary['file_bytes'] / 1e6:9.2f} MB")
    print(f"{source[0]:<34} {source[1] / 1e6:9.2f} MB")
    print(f"{'V:N:M layer tensors in the file':<34} {summary['vnm_initializer_bytes'] / 1e6:9.2f} MB")
    if not args.no_check:
        err = _onnxruntime_error(model, path, check)
        if err is None:
            print("onnxruntime not installed: file not run (pip install onnxruntime)")
        else:
            print(f"{'onnxruntime vs PyTorch, max |diff|':<34} {err:.3g} ({inputs})")
    return 0


def _dense_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _export_onnx(args: argparse.Namespace) -> int:
    from .onnx import _require_onnx

    try:
        _require_onnx()  # fail before calibrating
    except ImportError as e:
        print(f"vnm export onnx: {e}", file=sys.stderr)
        return 1
    if getattr(args, "compressed", None) is not None:
        if getattr(args, "model", None) is not None:
            print("vnm export onnx: give --model (prune it) or --compressed (export it as saved), not both",
                  file=sys.stderr)  # fmt: skip
            return 2
        return _export_compressed_onnx(args)
    problem = _check_model_dir(getattr(args, "model", None))
    if problem:
        print(f"vnm export onnx: {problem}", file=sys.stderr)
        return 2
    model, example, check, report = _prepare_minilm(args)
    print(report.summary())
    dense = ("dense parameters (fp32)", _dense_bytes(model))
    return _write_and_check(args, model, example, check, dense, "6 held-out docstrings")


def _onnxruntime_error(model, path: Path, batch: dict) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    got = sess.run(None, {k: batch[k].cpu().numpy() for k in names})[0]
    with torch.no_grad():
        ref = model(**batch)[0]  # last_hidden_state (or a head's first output)
    return float((torch.from_numpy(got) - ref.cpu()).abs().max())


def _export_tensorrt(args: argparse.Namespace) -> int:
    from .tensorrt import require_tensorrt, to_tensorrt

    try:
        require_tensorrt()  # fail before the slow steps
    except (ImportError, RuntimeError) as e:
        print(f"vnm export tensorrt: {e}", file=sys.stderr)
        return 1
    problem = _check_model_dir(getattr(args, "model", None))
    if problem:
        print(f"vnm export tensorrt: {problem}", file=sys.stderr)
        return 2
    import torch

    model, example, _, report = _prepare_minilm(args)
    model = model.to("cuda", torch.float16 if args.fp16 else torch.float32)
    example = {k: v.to("cuda") for k, v in example.items()}
    path = to_tensorrt(model, example, args.out, opset=args.opset, fp16=args.fp16, onnx_path=args.onnx)
    print(report.summary())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pattern", default="64:2:5", help="V:N:M pattern (default 64:2:5)")
    p.add_argument("--score", choices=["abs", "wanda", "ria"], default="ria", help="importance score (default ria)")
    p.add_argument("--calibration", type=int, default=64, help="calibration paragraphs for wanda/ria (default 64)")
    p.add_argument("--permute", action="store_true", help="search channel permutations (slower)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18..23, default 18)")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a transformers model directory (save_pretrained, tokenizer included) instead of the bundled MiniLM",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_export_parser(sub) -> None:
    """The `export` sub-command with its `onnx` and `tensorrt` targets."""
    p = sub.add_parser(
        "export", help="sparsify the bundled MiniLM (or --model DIR) and export it to ONNX or a TensorRT engine"
    )
    targets = p.add_subparsers(dest="target", required=True)
    onnx_p = targets.add_parser(
        "onnx", help="ONNX file with one VNMLinear node per sparse linear (runs in onnxruntime)"
    )
    _common(onnx_p)
    onnx_p.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs PyTorch check")
    onnx_p.add_argument(
        "--compressed",
        type=Path,
        default=None,
        help="export a compressed checkpoint (a save_compressed folder of a transformers model, config.json "
        "included) as saved, instead of pruning a model (--pattern, --score, --permute do not apply)",
    )
    onnx_p.set_defaults(func=_export_onnx)
    trt_p = targets.add_parser(
        "tensorrt", help="experimental: TensorRT engine with the V:N:M plugin (needs TensorRT >= 10.8 and a GPU)"
    )
    _common(trt_p)
    trt_p.add_argument("--fp16", action="store_true", help="export in float16 and let TensorRT use fp16 kernels")
    trt_p.add_argument("--onnx", type=Path, default=None, help="also keep the intermediate ONNX file here")
    trt_p.set_defaults(func=_export_tensorrt)
