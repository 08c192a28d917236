"""Time second-order V:N:M pruning (issue 26): one layer's reconstruction, and a whole model end to end.

1. ``layer``: ``prune_second_order`` on a (rows x cols) weight with H from
   random correlated activations: a fixed RIA mask reconstructed, and the OBS
   mask chosen during the SparseGPT pass (target: 4096 x 11008 in <= 2 s on one GPU).
2. ``model``: a Llama-2-7B-shaped model (random weights, fp16 on the GPU) pruned
   with ``sparsify_(model, VNMConfig(score="obs", reconstruct=True), data=...)``,
   calibrated layer by layer on ``--sequences`` x ``--seq-len`` random tokens
   (target: 32 layers, 128 x 2048 tokens in <= 10 min), with peak GPU memory.

Each measured time is printed beside its target, met or missed (a target
holds for its shape on a GPU; other runs say so). ``--build-layers K``
builds and prunes only K of the ``--layers`` blocks and extrapolates the
whole model's time as K blocks' time x layers / K (sequential pruning costs
the same per block; the one-off capture of block 0's inputs is scaled too,
so the estimate errs high), so that a GPU run fits in a few minutes.

GPU (the targets; the model extrapolated from 4 of its 32 blocks):

    python benchmarks/bench_second_order.py --device cuda --build-layers 4

CPU smoke run (small shapes, a 2-layer model):

    python benchmarks/bench_second_order.py --device cpu --shape 256 688 --layers 2 --hidden 128 \\
        --intermediate 344 --heads 4 --sequences 4 --seq-len 64 --batch 2

Prints the environment (kernels.benchmark.environment_line) and a table per part; writes nothing unless
``--json PATH`` is given (save_results: PATH with its suffix made .json, the environment recorded).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from vnm_compile import VNMConfig, sparsify_, vnm_mask
from vnm_compile.calibration.importance import importance
from vnm_compile.calibration.reconstruct import prune_second_order
from vnm_compile.kernels.benchmark import LLAMA_SHAPES, environment, environment_line, save_results_at

log = logging.getLogger("bench_second_order")

HIDDEN, INTERMEDIATE, HEADS, _, VOCAB = LLAMA_SHAPES["llama2-7b"]
# Issue 26's speed targets (one GPU): the shapes they hold for (Llama-2-7B: its down_proj, the whole model)
# and the most seconds allowed.
LAYER_TARGET = dict(shape=(HIDDEN, INTERMEDIATE), seconds=2.0)
MODEL_TARGET = dict(layers=32, hidden=HIDDEN, intermediate=INTERMEDIATE, sequences=128, seq_len=2048, seconds=600.0)


def verdict(seconds: float, target: float, applies: bool, what: str) -> str:
    """'met' / 'MISSED' against ``target`` seconds, or why the target does not apply to this run."""
    if not applies:
        return f"target <= {target:g} s holds for {what} on a GPU: not this run"
    return f"target <= {target:g} s: {'met' if seconds <= target else 'MISSED'}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_layer(rows: int, cols: int, patterns: list[str], device: torch.device, repeats: int) -> list[dict]:
    """Seconds per reconstruction of one (rows x cols) layer (median of ``repeats`` after a warm-up)."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(rows, cols, device=device, generator=g) / cols**0.5
    x = torch.randn(4096, cols, device=device, generator=g)
    x = x + 0.5 * torch.randn(4096, 64, device=device, generator=g) @ torch.randn(64, cols, device=device, generator=g)
    h = x.T @ x
    norm = h.diagonal().sqrt()
    results = []
    for pattern in patterns:
        for label, mask in (("ria mask", vnm_mask(importance(w, "ria", norm), pattern)), ("obs mask", None)):
            seconds = []
            for _ in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                rec = prune_second_order(w, h, pattern, mask=mask, method="sparsegpt")
                _sync(device)
                seconds.append(time.perf_counter() - start)
            seconds = sorted(seconds[1:])
            median = seconds[len(seconds) // 2]
            applies = device.type == "cuda" and (rows, cols) == LAYER_TARGET["shape"]
            row = dict(shape=f"{rows}x{cols}", pattern=pattern, mask=label, median_s=median,
                       error_masked=rec.error_masked, error=rec.error, target_s=LAYER_TARGET["seconds"],
                       target_met=median <= LAYER_TARGET["seconds"] if applies else None)  # fmt: skip
            shape = "x".join(map(str, LAYER_TARGET["shape"]))
            print(f"{row['shape']:>11} {pattern:>8} {label:>9} {median:>9.3f} {rec.error_masked:>12.4f} "
                  f"{rec.error:>10.4f}  {verdict(median, LAYER_TARGET['seconds'], applies, shape)}", flush=True)  # fmt: skip
            results.append(row)
    return results


def bench_model(args, device: torch.device) -> dict:
    """Prune a random Llama-shaped model end to end, layer by layer; seconds and peak GPU memory."""
    from transformers import LlamaConfig, LlamaModel

    built = min(args.build_layers or args.layers, args.layers)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=built,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=VOCAB,
        max_position_embeddings=max(4096, args.seq_len),
    )  # fmt: skip
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaModel(config).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (args.sequences, args.seq_len), generator=g)
    data = [{"input_ids": t.to(device), "use_cache": False} for t in tokens.split(args.batch)]
    cfg = VNMConfig(args.model_pattern, score="obs", reconstruct=True, permute=args.permute,
                    reconstruct_method="sparsegpt")  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    report = sparsify_(model, cfg, data=data, progress=True)
    _sync(device)
    measured = time.perf_counter() - start
    seconds = measured * args.layers / built
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    errors = [(r.error_masked, r.error) for r in report.sparsified]
    shape = dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, sequences=args.sequences,
                 seq_len=args.seq_len)  # fmt: skip
    applies = device.type == "cuda" and all(shape[k] == MODEL_TARGET[k] for k in shape)
    result = dict(
        **shape, built_layers=built, pattern=args.model_pattern, permute=args.permute, measured_s=measured,
        seconds=seconds, peak_gib=peak, linears=len(report.sparsified),
        mean_error_masked=sum(e[0] for e in errors) / len(errors), mean_error=sum(e[1] for e in errors) / len(errors),
        target_s=MODEL_TARGET["seconds"], target_met=seconds <= MODEL_TARGET["seconds"] if applies else None,
    )  # fmt: skip
    how = f"{seconds:.1f} s" if built == args.layers else f"{seconds:.1f} s extrapolated ({measured:.1f} s for {built})"
    what = "a 32-layer Llama-2-7B shape, 128 x 2048 tokens"
    print(f"\n{args.layers} layers, {args.sequences} x {args.seq_len} tokens, {args.model_pattern} obs+reconstruct "
          f"(permute={args.permute}): {how}, {verdict(seconds, MODEL_TARGET['seconds'], applies, what)}; "
          f"peak GPU memory {peak:.2f} GiB, {len(errors)} linears, "
          f"mean output error {result['mean_error_masked']:.4f} -> {result['mean_error']:.4f}")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--part", choices=["layer", "model", "both"], default="both")
    parser.add_argument("--shape", type=int, nargs=2, default=list(LAYER_TARGET["shape"]), metavar=("ROWS", "COLS"))
    parser.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8", "2:4"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--build-layers", type=int, default=None, metavar="K",
                        help="build and prune only K blocks; extrapolate the time to --layers")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE)
    parser.add_argument("--heads", type=int, default=HEADS)
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8, help="sequences per calibration batch")
    parser.add_argument("--model-pattern", default="64:2:8")
    parser.add_argument("--permute", action="store_true", help="also search channel permutations")
    parser.add_argument("--json", help="write the results to this .json file")
    args = parser.parse_args(argv)
    if args.build_layers is not None and args.build_layers < 1:
        parser.error(f"--build-layers must be >= 1, got {args.build_layers}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    env = environment(device, program="python ")  # the commit when the run starts
    print(environment_line(env) + "\n")
    out: dict = {"environment": env}
    with torch.no_grad():
        if args.part in ("layer", "both"):
            print(f"{'shape':>11} {'pattern':>8} {'mask':>9} {'median s':>9} {'err masked':>12} {'err recon':>10}")
            out["layer"] = bench_layer(*args.shape, args.patterns, device, args.repeats)
        if args.part in ("model", "both"):
            out["model"] = bench_model(args, device)
    if args.json:
        path = Path(args.json)
        save_results_at(path, out)
    return out


if __name__ == "__main__":
    main()
