"""GPU kernels one compiled decode step launches, and its time, with and without permutations (issue 25).

    python benchmarks/count_launches.py                     # Llama-3-8B shapes, 1 layer, 64:2:8, batch 1 and 16
    python benchmarks/count_launches.py --layers 4 --patterns 64:2:8 64:2:5 --tokens 1 16 2048
    python benchmarks/count_launches.py --smoke             # tiny shapes on the CPU: checks the code paths

Variants (the same random fp16 weights; V:N:M ones pruned by sparsify_ with ABS):
- dense: inductor;
- unpermuted: sparsify_(permute=False);
- permuted: sparsify_(permute=True) with random permutations shared as the search shares them
  (bench_e2e --permute random), the backend's default permutations="index";
- joint: the same with VNMConfig(joint_permutations=True) (no index op between gate/up and down_proj, nor
  between v_proj and o_proj: per-head random permutations, attention pairs from find_attention_links);
- folded: permuted, compiled with permutations="fold" (the kept columns scattered in the kernels' indices).
Each is compiled with fullgraph=True (options force nothing else). "kernels" counts the CUDA kernels one
call launches (torch.profiler, outside CUDA graphs: the nodes a captured graph replays); "index" the
launches whose name says gather/index: an unfused permutation, but also a norm or activation kernel with a
gather fused in, which dense runs anyway (compare the "kernels" totals for the launches permutations add;
bench_deploy.py --profile lists the kernels by time); "ms" the median of CUDA-graph replays
(kernels.benchmark.time_model_ms). The lowered layers' permutations column is the compile report's.
Writes launches.json / launches.md (kernels.benchmark.save_results, environment() recorded) to --out (default
benchmarks/results/<gpu>/; --smoke: /tmp/count_launches_smoke/).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("dense", "unpermuted", "permuted", "joint", "folded")


def build(args):
    from transformers import LlamaConfig, LlamaModel

    from vnm_compile.kernels.benchmark import LLAMA_SHAPES

    shape = (256, 896, 4, 2) if args.smoke else LLAMA_SHAPES["llama3-8b"][:4]  # 32 heads, 8 KV heads
    cfg = LlamaConfig(hidden_size=shape[0], intermediate_size=shape[1], num_attention_heads=shape[2],
                      num_key_value_heads=shape[3], num_hidden_layers=args.layers, vocab_size=512,
                      max_position_embeddings=4096)  # fmt: skip
    torch.manual_seed(0)
    with torch.device(args.device):
        return LlamaModel(cfg).to(args.dtype).eval()


def sparsified(model, pattern: str, variant: str, device: str):
    import copy

    from bench_e2e import _searched

    from vnm_compile import VNMConfig, sparsify_
    from vnm_compile.calibration.attention import find_attention_links
    from vnm_compile.calibration.chains import find_chains
    from vnm_compile.calibration.groups import find_input_groups

    sparse = copy.deepcopy(model)
    batch = torch.randint(0, 512, (1, 16), device=device)
    permute = variant != "unpermuted"
    config = VNMConfig(pattern, score="abs", permute=permute, joint_permutations=variant == "joint")
    with torch.no_grad(), _searched("random") if permute else contextlib.nullcontext():
        groups, chains = find_input_groups(sparse, batch), find_chains(sparse, batch)
        attention = find_attention_links(sparse, batch) if variant == "joint" else []
        sparsify_(sparse, config, groups=groups, chains=chains, attention=attention, progress=False)
    return sparse


def compiled(model, variant: str, smoke: bool):
    if variant == "dense":
        return torch.compile(model, backend="eager" if smoke else "inductor", fullgraph=True)
    options = {"permutations": "fold" if variant == "folded" else "index", "inductor": not smoke}
    if smoke:
        options["force_sparse"] = True
    return torch.compile(model, backend="vnm", options=options, fullgraph=True)


def count_kernels(fn) -> tuple[int, int]:
    """(kernels, index/gather kernels) one call launches (CPU smoke: aten ops, index_select ones)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda]
    if not cuda:
        events = [e for e in events if e.name.startswith(("aten::", "vnm::")) and "index" in e.name or
                  e.name.startswith("vnm::")]  # fmt: skip
    names = [e.name for e in events]
    return len(names), sum(("index" in n.lower() or "gather" in n.lower()) for n in names)


def time_ms(fn, smoke: bool) -> float:
    if smoke:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from vnm_compile.kernels.benchmark import time_model_ms

    return time_model_ms(fn, rep_ms=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--patterns", nargs="+", default=["64:2:8"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16], help="batch of one-token decode steps")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("count_launches needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    args.device, args.dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.float16)
    import vnm_compile  # noqa: F401  (registers the backend)
    from vnm_compile.backend import last_report
    from vnm_compile.kernels.benchmark import environment, markdown_header, save_results, versions
    from vnm_compile.kernels.dispatch import results_dir

    env = environment(args.device, args.dtype, program="python ")  # the commit when the run starts
    model = build(args)
    rows = []
    for pattern in args.patterns:
        cache = {}
        for variant in args.variants:
            if variant == "dense" and rows and any(r["variant"] == "dense" for r in rows):
                continue
            base = "permuted" if variant == "folded" else variant
            if variant != "dense" and base not in cache:
                cache[base] = sparsified(model, pattern, base, args.device)
            m = model if variant == "dense" else cache[base]
            for tokens in args.tokens:
                torch._dynamo.reset()
                fn = compiled(m, variant, args.smoke)
                x = torch.randint(0, 512, (tokens, 1), device=args.device)
                with torch.no_grad():
                    fn(input_ids=x, use_cache=False)  # compile
                    kernels, index = count_kernels(lambda fn=fn, x=x: fn(input_ids=x, use_cache=False))
                    ms = time_ms(lambda fn=fn, x=x: fn(input_ids=x, use_cache=False), args.smoke)
                report = last_report() if variant != "dense" else None
                perms = sorted({r.permutations for r in report.lowered}) if report else []
                rows.append({"pattern": "-" if variant == "dense" else pattern, "variant": variant, "tokens": tokens,
                             "kernels": kernels, "index_kernels": index, "ms": ms,
                             "lowered": len(report.lowered) if report else 0, "permutations": perms})  # fmt: skip
                print(rows[-1], flush=True)
    out = args.out or (Path("/tmp/count_launches_smoke") if args.smoke else results_dir() / env["gpu_slug"])
    result = {"gpu": "cpu (smoke)" if args.smoke else env["gpu"], "versions": versions(env), "command": env["command"],
              "environment": env, "layers": args.layers, "rows": rows}  # fmt: skip
    lines = [markdown_header(f"Kernels per decode step, {result['gpu']}", env),
             "| pattern | variant | tokens | kernels | index kernels | ms | lowered |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['variant']} | {r['tokens']} | {r['kernels']} | {r['index_kernels']} | "
                     f"{r['ms']:.4f} | {r['lowered']} |")  # fmt: skip
    save_results(out, "launches", result, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
