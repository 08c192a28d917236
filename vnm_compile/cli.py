"""The `vnm` command line."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_results, run_demo

    print("vnm demo: all-MiniLM-L6-v2 (real weights, offline), calibrated on stdlib docstrings;")
    print("mean cosine of sentence embeddings to the dense model on held-out docstrings (1.0 = identical)\n")
    results = run_demo(
        patterns=tuple(args.patterns), scores=tuple(args.scores), n_calibration=args.calibration, n_eval=args.eval,
        permute=(False,) if args.no_permute else (False, True), permute_scores=tuple(args.permute_scores),
        progress=not args.no_progress, recover_steps=args.recover_steps, compile_check=not args.no_compile,
        reconstruct_scores=tuple(args.reconstruct_scores),
    )  # fmt: skip
    print(format_results(results))
    print("\nsparsify reports:")
    for r in results:
        if r.summary and not r.note:
            recon = "+reconstruct" if r.reconstruct else ""
            print(f"  {r.pattern} {r.score}{recon}{' permuted' if r.permute else ''}: {r.summary}")
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="prune the bundled MiniLM model end to end and print a quality table")
    p.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8", "2:4"], help="patterns to try")
    p.add_argument("--scores", nargs="+", default=["abs", "ria"], choices=["abs", "wanda", "ria"])
    p.add_argument("--calibration", type=int, default=None,
                   help="calibration paragraphs (default: all, 980 from the calibration modules)")  # fmt: skip
    p.add_argument("--eval", type=int, default=256, help="held-out evaluation paragraphs (default 256)")
    p.add_argument("--permute-scores", nargs="+", default=["ria"], choices=["abs", "wanda", "ria", "obs"],
                   help="scores also run with channel permutation (default: ria)")  # fmt: skip
    p.add_argument("--no-permute", action="store_true", help="skip the channel-permutation runs")
    p.add_argument("--reconstruct-scores", nargs="*", default=["obs"], choices=["abs", "wanda", "ria", "obs"],
                   help="scores also run with reconstruct=True, second-order pruning (default: obs; none to skip)")  # fmt: skip
    p.add_argument("--recover-steps", type=int, default=100,
                   help="recovery-training steps for the best V:N:M row (default 100; 0 skips it)")  # fmt: skip
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(backend='vnm') check")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_demo)


def _select(args: argparse.Namespace) -> int:
    import json

    from .calibration.selection import load_speedups, sift_patterns

    if args.per_layer is not None:
        return _select_per_layer(args)
    if args.threshold is None:
        print("vnm select: --threshold is required (the speed-up over dense you need)", file=sys.stderr)
        return 2
    try:
        result = sift_patterns(load_speedups(args.speedups), args.threshold)
    except FileNotFoundError:
        print(f"vnm select: {args.speedups}: no such file (vnm bench writes speedups.json)", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        print(f"vnm select: {args.speedups}: {e}", file=sys.stderr)
        return 2
    print(
        f"vnm select: {len(result.candidates)} measured patterns from {args.speedups}, threshold {args.threshold:g}x\n"
    )
    print(result.table())
    print(
        f"\n1. speed-up >= {args.threshold:g}: {', '.join(map(str, result.fast_enough)) or 'none'}"
        f"\n2. smallest M per V:    {', '.join(map(str, result.smallest_m)) or 'none'}"
    )
    if result.pick is None:
        best = max(result.candidates.items(), key=lambda kv: kv[1], default=None)
        fastest = f"; the fastest measured is {best[0]} at {best[1]:.3f}x" if best else ""
        print(f"3. no pattern reaches speed-up {args.threshold:g}{fastest}")
        return 1
    print(f"3. largest mask diversity: {result.pick} (speed-up {result.candidates[result.pick]:.3f}x)")
    print(f"\npick: {result.pick}")
    return 0


def _select_per_layer(args: argparse.Namespace) -> int:
    """`vnm select --per-layer COSTS`: one pattern per layer (calibration/plan.py)."""
    import json

    from .calibration.plan import load_layer_costs, plan_patterns

    if (args.threshold is None) == (args.max_cost is None):
        print(
            "vnm select --per-layer: give exactly one of --threshold (target speed-up) and --max-cost", file=sys.stderr
        )
        return 2
    try:
        mix = {int(t): float(w) for t, w in (item.split(":") for item in args.tokens)}
    except ValueError:
        print(f"vnm select: --tokens takes TOKENS:WEIGHT pairs (e.g. 1:256 2048:1), got {args.tokens}", file=sys.stderr)
        return 2
    try:
        with open(args.speedups) as f:
            speed = json.load(f)
        shapes, costs = load_layer_costs(args.per_layer)
        plan = plan_patterns(shapes, speed, costs, target_speedup=args.threshold, max_cost=args.max_cost,
                             token_mix=mix, other_fraction=args.other_fraction)  # fmt: skip
    except FileNotFoundError as e:
        print(f"vnm select: {e.filename}: no such file", file=sys.stderr)
        return 2
    except (OSError, json.JSONDecodeError, ValueError, TypeError) as e:
        print(f"vnm select: {e}", file=sys.stderr)
        return 1 if "reaches speed-up" in str(e) else 2
    print(f"vnm select --per-layer: {len(shapes)} layers from {args.per_layer}, speed-ups from {args.speedups}\n")
    print(plan.table())
    if args.out is not None:
        args.out.write_text(json.dumps(plan.layer_patterns, indent=1))
        print(f"\nwrote {args.out}: VNMConfig(pattern=..., layer_patterns=json.load(open({str(args.out)!r})))")
    return 0


def _add_select(sub) -> None:
    from pathlib import Path

    p = sub.add_parser("select", help="choose V:N:M from measured speed-ups (paper section 4.1), or one per layer")
    p.add_argument("--speedups", type=Path, required=True,
                   help='JSON {"64:2:5": 1.8, ...} (vnm bench writes one); with --per-layer also a linear.json')  # fmt: skip
    p.add_argument("--threshold", type=float, default=None, help="the speed-up over dense you need")
    p.add_argument("--per-layer", type=Path, default=None, metavar="COSTS",
                   help="choose one pattern per layer from these accuracy costs (plan.save_layer_costs writes them)")  # fmt: skip
    p.add_argument("--max-cost", type=float, default=None, help="--per-layer: the total accuracy cost allowed")
    p.add_argument("--tokens", nargs="+", default=["1:1"], metavar="TOKENS:WEIGHT",
                   help="--per-layer: the token mix, e.g. 1:256 2048:1 (default 1:1, decode at batch 1)")  # fmt: skip
    p.add_argument("--other-fraction", type=float, default=0.0,
                   help="--per-layer: the dense model's time share outside the linears (attention, norms)")  # fmt: skip
    p.add_argument("--out", type=Path, default=None, help="--per-layer: write {layer: pattern} here (JSON)")
    p.set_defaults(func=_select)


def _add_export(sub) -> None:
    from .export.cli import add_export_parser  # light: the handlers import onnx/tensorrt

    add_export_parser(sub)


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    if not torch.cuda.is_available():
        print("vnm bench needs a CUDA GPU", file=sys.stderr)
        return 1
    from .kernels.benchmark import GRIDS, custom_grid, run_benchmark, write_results
    from .kernels.dispatch import gpu_slug
    from .kernels.tables import cache_dir

    try:
        grid = custom_grid(GRIDS[args.grid], args.shapes, args.tokens, args.patterns)
    except ValueError as err:
        print(f"vnm bench: {err}", file=sys.stderr)
        return 2

    if args.prewarm or args.model_config:
        return _prewarm(args, grid)
    out = args.out or cache_dir() / gpu_slug()  # the dispatcher reads it from there before the shipped table
    results = run_benchmark(grid, progress=not args.no_progress, checkpoint=out / "linear.json")
    for p in write_results(results, out):
        print(f"wrote {p}")
    print(Path(out, "linear.md").read_text())
    return 0


def model_shapes(config: dict) -> list[tuple[int, int]]:
    """(out, in) of a transformer's linears from its config.json (hidden_size, intermediate_size, heads, KV
    heads, head_dim), with the sibling launches a compiled model fuses (q+k+v, gate+up)."""
    h, i = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config.get("num_attention_heads", 1))
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or h // heads)
    q, k = heads * hd, kv * hd
    shapes = [(q, h), (k, h), (h, q), (i, h), (h, i), (q + 2 * k, h)]
    if config.get("hidden_act", "") in ("silu", "swish") or "llama" in str(config.get("model_type", "")):
        shapes.append((2 * i, h))  # gate + up
    return sorted(set(shapes))


def _prewarm(args: argparse.Namespace, grid) -> int:
    """`vnm bench --prewarm`: measure and store the dense-or-sparse choices of vnm::compressed_linear."""
    import json

    import torch

    from .kernels.compressed import DECODE_TOKENS, path_cache_file, prewarm_paths

    shapes = [(o, i) for o, i, _ in grid.shapes]
    if args.model_config:
        try:
            shapes = model_shapes(json.loads(args.model_config.read_text()))
        except (OSError, ValueError, KeyError) as err:
            print(f"vnm bench: cannot read the shapes of {args.model_config}: {err!r}", file=sys.stderr)
            return 2
    tokens = args.tokens or [64, 128, 256, 512, 1024, 2048, 4096, 8192]
    done = prewarm_paths(shapes, grid.patterns, tokens, progress=not args.no_progress)
    print(
        f"{'out x in':>14} {'pattern':>8} {'tokens':>6} choice  (measured now; decode <= {DECODE_TOKENS} runs sparse)"
    )
    for key, choice in done.items():
        _layout, _dtype, out, in_f, v, n, m, bucket = key.split("|")
        print(f"{f'{out}x{in_f}':>14} {f'{v}:{n}:{m}':>8} {bucket:>6} {choice}")
    print(f"{len(done)} choices written to {path_cache_file(torch.device('cuda', torch.cuda.current_device()))}")
    return 0


def add_grid_arguments(p: argparse.ArgumentParser) -> None:
    """--shapes/--tokens/--patterns (benchmark.custom_grid), shared by `vnm bench` and bench_linear.py."""
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="instead of the grid's shapes: families (llama2-7b, vit-b, ...) or OUTxIN",
    )
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="instead of the grid's token counts")
    p.add_argument("--patterns", nargs="+", default=None, help="instead of the grid's V:N:M patterns")


def _add_bench(sub) -> None:
    from pathlib import Path

    p = sub.add_parser("bench", help="time dense vs cuSPARSELt 2:4 vs V:N:M linear layers on this GPU")
    p.add_argument("--grid", choices=["quick", "default", "full"], default="default", help="what to measure")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default $VNM_CACHE_DIR/<gpu>, ~/.cache/vnm_compile/<gpu>; the compiler reads it there)",
    )
    add_grid_arguments(p)
    p.add_argument(
        "--prewarm",
        action="store_true",
        help="instead: time dense against sparse for compressed linears of these shapes and patterns at prefill "
        "token counts (--tokens, default 64-8192) and store the choices in the path cache, so a compressed "
        "model's first calls find them decided",
    )
    p.add_argument(
        "--model-config", type=Path, default=None, help="with --prewarm: the shapes of this transformers config.json"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_bench)


# Each sub-command module contributes one `_add_*` function here.
_SUBCOMMANDS = [_add_demo, _add_bench, _add_select, _add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnm", description="V:N:M sparsity for Transformers on NVIDIA GPUs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
