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
        progress=not args.no_progress,
    )  # fmt: skip
    print(format_results(results))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="prune the bundled MiniLM model end to end and print a quality table")
    p.add_argument("--patterns", nargs="+", default=["64:2:5", "2:4"], help="patterns to try (default: 64:2:5 2:4)")
    p.add_argument("--scores", nargs="+", default=["abs", "ria"], choices=["abs", "wanda", "ria"])
    p.add_argument("--calibration", type=int, default=256, help="calibration paragraphs (default 256)")
    p.add_argument("--eval", type=int, default=256, help="held-out evaluation paragraphs (default 256)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=_demo)


# Each sub-command module contributes one `_add_*` function here.
_SUBCOMMANDS = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vnm", description="V:N:M sparsity for Transformers on NVIDIA GPUs")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
