"""Importance kept by joint permutations (VNMConfig.joint_permutations: MLP chains and attention v/o pairs)
against independent ones.

    python benchmarks/bench_joint_permutation.py minilm [--patterns 64:2:5 64:2:8] [--out FILE]
    python benchmarks/bench_joint_permutation.py minilm --outputs [--score obs] [--out FILE]
    python benchmarks/bench_joint_permutation.py llama-mlp [--hidden 4096 --intermediate 11008] [--out FILE]

--out FILE.md: the table with the command and the environment (kernels.benchmark.save_results; the table and
the environment also as FILE.json).

Joint: the consumer's (down_proj / fc2) input permutation is searched first and used as the producers'
(gate/up, fc1) output permutation, so no index op runs between them. Independent: every layer's
permutations searched on their own (the input permutation still shared by layers reading one tensor).
Attention: o_proj's input permutation, searched per head, is v_proj's output permutation ("attn kept": the
mean over those layers).

--outputs: also VNMConfig(permute_outputs=False) (input permutations only, no output permutation at
inference; with joint permutations, only the linked ones) and no permutation at all. --score obs: the
second-order path (score "obs", reconstruct=True, the calibration texts as data), which ignores joint
permutations: independent, input-only and none.

minilm: all-MiniLM-L6-v2 (real weights, the demo's model), RIA with calibration on the demo's docstrings;
also the embedding cosine to the dense model on held-out docstrings. llama-mlp: one Llama MLP block of
random weights (transformers' LlamaMLP, default Llama-2-7B shapes) calibrated on random tokens whose
channels have heavy-tailed scales (real activations have outlier channels), RIA.
The table gives the mean importance kept (fraction of each layer's total) over the MLP layers (the only
ones the option changes) and over all sparsified layers, and the relative change.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from vnm_compile import VNMConfig, calibrate, sparsify_
from vnm_compile.kernels.benchmark import LLAMA_SHAPES, environment, markdown_header, save_results_at


def _mlp_layers(report, attention=frozenset()) -> list:
    return [
        r for r in report.sparsified if r.name not in attention and (r.in_perm_from or r.out_perm_to or _is_mlp(r.name))
    ]


def _attention_layers(report, attention) -> list:
    return [r for r in report.sparsified if r.name in attention]


def _is_mlp(name: str) -> bool:
    return any(
        k in name for k in ("gate_proj", "up_proj", "down_proj", "intermediate.dense", "output.dense", "fc1", "fc2")
    )


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def _variants(attention, outputs: bool, score: str) -> list[tuple[str, dict, list | None]]:
    """(label, VNMConfig fields, sparsify_'s attention argument) per row of the table."""
    if score == "obs":  # the second-order path chooses its permutations block by block, never joint
        rows = [("independent", {}, None), ("in-only", {"permute_outputs": False}, None)]
        return rows + [("none", {"permute": False}, None)] if outputs else rows
    rows = [("independent", {}, None), ("joint", {"joint_permutations": True}, None)]
    if attention:
        rows.insert(1, ("joint MLP", {"joint_permutations": True}, []))
    if outputs:
        rows += [("in-only", {"permute_outputs": False}, None),
                 ("joint+in-only", {"joint_permutations": True, "permute_outputs": False}, None),
                 ("none", {"permute": False}, None)]  # fmt: skip
    return rows


def _compare(model, stats, patterns, evaluate=None, outputs=False, score="ria", data=None) -> list[str]:
    """independent vs joint MLP chains only vs joint (MLP chains and attention v/o pairs, stats.attention),
    and with ``outputs`` input-only permutations and none (_variants); attn kept: mean over the v_proj /
    o_proj layers of the attention pairs (v, o: each side alone)."""
    v_names = {link.v for link in getattr(stats, "attention", [])}
    o_names = {link.o for link in getattr(stats, "attention", [])}
    attention = v_names | o_names
    second_order = {"reconstruct": True} if score == "obs" else {}
    lines = [f"{'pattern':>8} {'permutations':>12} {'MLP kept':>9} {'attn kept':>9} {'v kept':>7} {'o kept':>7} "
             f"{'all kept':>9} {'linked':>6} {'cosine':>7} {'search s':>8}"]  # fmt: skip
    for pattern in patterns:
        base = None
        for label, fields, links in _variants(attention, outputs, score):
            m = copy.deepcopy(model)
            start = time.perf_counter()
            config = VNMConfig(pattern, score=score, **second_order, **fields)
            report = sparsify_(m, config, stats, data=data, progress=False, attention=links)
            seconds = time.perf_counter() - start
            mlp = _mean(r.importance_kept for r in _mlp_layers(report, attention))
            attn = _mean(r.importance_kept for r in _attention_layers(report, attention))
            v_kept = _mean(r.importance_kept for r in _attention_layers(report, v_names))
            o_kept = _mean(r.importance_kept for r in _attention_layers(report, o_names))
            linked = sum(bool(r.in_perm_from or r.out_perm_to) for r in report.sparsified)
            cos = f"{evaluate(m):.4f}" if evaluate is not None else "-"
            rel = "" if base is None else (f"  ({(mlp - base[0]) / base[0] * 100:+.2f} % MLP, "
                                           f"{(attn - base[1]) / base[1] * 100:+.2f} % attn)")  # fmt: skip
            base = (mlp, attn) if base is None else base
            lines.append(f"{pattern:>8} {label:>12} {mlp:>9.4f} {attn:>9.4f} {v_kept:>7.4f} {o_kept:>7.4f} "
                         f"{report.mean_importance_kept():>9.4f} {linked:>6} {cos:>7} {seconds:>8.1f}{rel}")  # fmt: skip
    return lines


def bench_minilm(args) -> list[str]:
    from vnm_compile.data import calibration_and_eval_texts
    from vnm_compile.models import embed, load_minilm, text_batches

    model, tok = load_minilm()
    calib_texts, eval_texts = calibration_and_eval_texts(args.calibration, 128)
    held_out = text_batches(tok, eval_texts)
    dense = embed(model, held_out)
    stats = calibrate(model, text_batches(tok, calib_texts), progress=False)

    def cosine(m) -> float:
        return float((embed(m, held_out) * dense).sum(-1).mean())

    score = "OBS + reconstruct" if args.score == "obs" else "RIA"
    head = [f"all-MiniLM-L6-v2, {score}, {args.calibration} calibration docstrings; chains traced: "
            f"{len(stats.chains)}, attention pairs proven: {len(stats.attention)}"]  # fmt: skip
    data = text_batches(tok, calib_texts) if args.score == "obs" else None
    return head + _compare(model, stats, args.patterns, cosine, args.outputs, args.score, data)


def bench_llama_mlp(args) -> list[str]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate)
    mlp = LlamaMLP(cfg).eval()
    scale = torch.distributions.LogNormal(0.0, 1.0).sample((args.hidden,))  # heavy-tailed channel scales
    batches = [torch.randn(4, 64, args.hidden) * scale for _ in range(4)]
    stats = calibrate(mlp, batches, progress=False)
    head = [f"LlamaMLP {args.hidden}/{args.intermediate}, random weights, RIA on random tokens; "
            f"chains traced: {len(stats.chains)}"]  # fmt: skip
    return head + _compare(mlp, stats, args.patterns, outputs=args.outputs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("minilm", "llama-mlp"):
        p = sub.add_parser(name)
        p.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8"])
        p.add_argument("--out", help="also write the table (with the command and environment) to this .md file")
        p.add_argument("--outputs", action="store_true", help="also input-only permutations and none")
        if name == "minilm":
            p.add_argument("--calibration", type=int, default=128)
            p.add_argument("--score", choices=["ria", "obs"], default="ria")
        else:
            hidden, intermediate = LLAMA_SHAPES["llama2-7b"][:2]
            p.add_argument("--hidden", type=int, default=hidden)
            p.add_argument("--intermediate", type=int, default=intermediate)
    args = parser.parse_args(argv)
    env = environment("cpu", program="python ")  # the commit when the run starts: a run takes minutes
    lines = bench_minilm(args) if args.what == "minilm" else bench_llama_mlp(args)
    text = "\n".join(lines)
    print(text)
    if args.out:
        title = (
            "permutations: searched, joint, input-only, none"
            if args.outputs
            else "joint vs independent MLP permutations"
        )
        out = Path(args.out)
        markdown = f"{markdown_header(title, env)}\n```\n{text}\n```\n"
        save_results_at(out, {"environment": env, "table": lines}, markdown, echo=False)


if __name__ == "__main__":
    main()
