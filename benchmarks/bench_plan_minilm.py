"""Per-layer patterns vs one pattern at the same expected speed-up (issue 29), MiniLM, the `vnm demo` metric.

1. ``layer_costs``: each linear's importance lost at each candidate pattern (RIA, ``--permute`` optional);
2. for each uniform pattern, its expected speed-up under ``plan_patterns``' time model (the speed table at
   ``--table``, the token mix ``--tokens``), then ``plan_patterns(target_speedup=that)``;
3. both models pruned (``sparsify_``, the plan through ``VNMConfig(layer_patterns=...)``) and compared to
   the dense model: mean cosine of the sentence embeddings on held-out docstrings.

The speed-ups are the table's (nearest measured shape: MiniLM's 384-wide layers are smaller than any
measured one), so the expected speed-ups are a model, not a measurement; the cosines are measured.

    python benchmarks/bench_plan_minilm.py --table vnm_compile/kernels/tables/nvidia-h100-80gb-hbm3.json \\
        --tokens 1:1 --out benchmarks/results/cpu/plan_minilm.md

Writes the table (command and environment on top) to ``--out`` and the results (kernels.benchmark.save_results)
beside it as a .json; prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from vnm_compile import VNMConfig, calibrate, sparsify_
from vnm_compile.calibration.plan import layer_costs, plan_patterns
from vnm_compile.data import calibration_and_eval_texts
from vnm_compile.kernels.benchmark import environment, markdown_header, save_results_at
from vnm_compile.models import embed, load_minilm, text_batches


def markdown(result: dict) -> str:
    """The table of ``result`` (main's), with the command and the environment."""
    lines = [
        markdown_header("One pattern per layer vs one for the model (MiniLM, `vnm demo` metric)", result["environment"]),
        f"Token mix {result['token_mix']}. RIA"
        f"{' + permutations' if result['permute'] else ' (no permutations)'}; per-layer cost = importance lost. "
        "'expected' speed-ups are plan_patterns' time model on the speed table "
        f"`{result['table']}` (a linear.json: the nearest measured shape; a speedups.json: one speed-up per "
        "pattern for every layer; not measured on MiniLM); the cosines are measured (mean embedding cosine to "
        "the dense model on held-out docstrings). Every linear but none of the embeddings is a candidate.", "",
        "| uniform | expected speed-up | plan's expected | cosine uniform | cosine per-layer | density uniform "
        "| density per-layer | plan |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in result["rows"]:
        if "plan_speedup" not in r:
            lines.append(f"| {r['pattern']} | {r['expected_speedup']:.3f} | | | | | | {r['plan']} |")
        else:
            lines.append(f"| {r['pattern']} | {r['expected_speedup']:.3f} | {r['plan_speedup']:.3f} "
                         f"| {r['cosine_uniform']:.4f} | {r['cosine_plan']:.4f} | {r['density_uniform']:.3f} "
                         f"| {r['density_plan']:.3f} | {r['plan']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True, help="a linear.json / shipped dispatch table, or a speedups.json")
    p.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8", "128:2:8", "64:2:16"])
    p.add_argument("--tokens", nargs="+", default=["1:1"], help="token mix TOKENS:WEIGHT")
    p.add_argument("--permute", action="store_true", help="RIA with channel permutations (slower)")
    p.add_argument("--calibration", type=int, default=256)
    p.add_argument("--eval", type=int, default=256)
    p.add_argument(
        "--out", default=None, help="write the markdown table here (FILE.md; the results beside it, FILE.json)"
    )
    args = p.parse_args(argv)
    env = environment("cpu", program="python ")  # the commit when the run starts
    mix = {int(t): float(w) for t, w in (item.split(":") for item in args.tokens)}
    speed = json.loads(Path(args.table).read_text())
    model, tokenizer = load_minilm()
    calib_texts, eval_texts = calibration_and_eval_texts(args.calibration, args.eval)
    calib, held_out = text_batches(tokenizer, calib_texts), text_batches(tokenizer, eval_texts)
    dense = embed(model, held_out)
    stats = calibrate(model, calib, progress=False)
    config = VNMConfig("64:2:8", score="ria", permute=args.permute)
    costs = layer_costs(model, args.patterns, config, stats)

    def cosine(layer_patterns: dict[str, str]) -> tuple[float, float]:
        pruned = copy.deepcopy(model)
        cfg = VNMConfig("64:2:8", score="ria", permute=args.permute, layer_patterns=layer_patterns)
        report = sparsify_(pruned, cfg, stats, progress=False)
        weights = sum(r.shape[0] * r.shape[1] for r in report.layers)
        density = sum(r.density * r.shape[0] * r.shape[1] for r in report.layers) / weights
        return float((embed(pruned, held_out) * dense).sum(-1).mean()), density

    rows = []
    for pattern in args.patterns:
        uniform = {name: pattern for name in costs}
        # the uniform choice's expected speed-up under the same time model: a plan that may only take it
        only = {name: {pattern: c[pattern]} for name, c in costs.items()}
        everything = sum(c[pattern] for c in costs.values()) + 1.0
        expected = plan_patterns(model, speed, only, max_cost=everything, token_mix=mix).speedup
        if expected <= 1.0:
            rows.append({"pattern": pattern, "expected_speedup": expected, "plan": "no expected speed-up"})
            continue
        plan = plan_patterns(model, speed, costs, target_speedup=expected, token_mix=mix)
        cos_u, dens_u = cosine(uniform)
        cos_p, dens_p = cosine(plan.layer_patterns)
        chosen = {}
        for r in plan.layers:
            key = "dense" if r.pattern is None else str(r.pattern)
            chosen[key] = chosen.get(key, 0) + 1
        mixdesc = ", ".join(f"{k} x{v}" for k, v in sorted(chosen.items()))
        rows.append({"pattern": pattern, "expected_speedup": expected, "plan_speedup": plan.speedup,
                     "cosine_uniform": cos_u, "cosine_plan": cos_p, "density_uniform": dens_u,
                     "density_plan": dens_p, "plan": mixdesc, "layer_patterns": plan.layer_patterns})  # fmt: skip
        print(f"{pattern}: expected {expected:.3f}x; plan {plan.speedup:.3f}x; cosine {cos_u:.4f} -> {cos_p:.4f} "
              f"({mixdesc})", flush=True)  # fmt: skip
    result = {"environment": env, "table": args.table, "token_mix": mix, "permute": args.permute,
              "calibration": len(calib_texts), "eval": len(eval_texts), "rows": rows}  # fmt: skip
    if args.out:
        out = Path(args.out)
        save_results_at(out, result, markdown(result))
    else:
        print(markdown(result))
    return result


if __name__ == "__main__":
    main()
