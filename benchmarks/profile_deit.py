"""Where a compiled DeiT-base spends its time: torch.profiler's CUDA kernel table, eager and inductor.

    python benchmarks/profile_deit.py                # transformers' masks as they are
    python benchmarks/profile_deit.py --skip-masks   # as bench_e2e.py runs it (skip_unneeded_masks)

DeiT-base shapes (DeiTConfig defaults, --layers of 12 layers), random fp16 weights, batch --batch at
224 px: the model of bench_e2e.py's DeiT case. Prints, per mode, the stream-timed milliseconds per
forward (20 calls, no CUDA graph) and the kernels sorted by CUDA time over 10 profiled forwards;
writes each table to --out/deit_prof_<mode>[_nomask].txt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-masks", action="store_true", help="bench_e2e.skip_unneeded_masks() first")
    parser.add_argument("--rows", type=int, default=14, help="kernels listed per table")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import DeiTConfig, DeiTModel

    if not torch.cuda.is_available():
        print("profile_deit needs a CUDA GPU", file=sys.stderr)
        return 1
    if args.skip_masks:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_e2e

        print("replaced:", bench_e2e.skip_unneeded_masks())
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeiTModel(DeiTConfig(num_hidden_layers=args.layers), add_pooling_layer=False).half().eval()
    x = torch.randn(args.batch, 3, 224, 224, device="cuda", dtype=torch.half)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_nomask" if args.skip_masks else ""
    for name, fn in (("eager", model), ("inductor", torch.compile(model, fullgraph=True))):
        with torch.no_grad():
            for _ in range(5):
                fn(pixel_values=x)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn(pixel_values=x)
            end.record()
            torch.cuda.synchronize()
            print(f"{name}: {start.elapsed_time(end) / 20:.3f} ms/forward (stream-timed, no graph)")
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn(pixel_values=x)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90)
        print(table)
        (args.out / f"deit_prof_{name}{tag}.txt").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
