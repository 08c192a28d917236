"""Recovery training on all-MiniLM-L6-v2 at 64:2:5: fixed masks vs SR-STE vs three-stage LoRA at equal steps.

The model is pruned one-shot with RIA (with channel permutation when
vnm_compile.calibration.permutation is available), then each method trains a
copy towards the dense model's hidden states on standard-library docstrings
(vnm_compile.data calibration texts) and is evaluated on held-out docstrings
(disjoint modules) by

* mean cosine between the sparse and dense sentence embeddings, and
* nearest-neighbour agreement: the fraction of held-out texts whose nearest
  other text (by embedding cosine) is the same under the sparse and the dense model.

Run:  python benchmarks/recovery_minilm.py --steps 200
Writes benchmarks/results/<device>/recovery_minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

from vnm_compile import VNMConfig, calibrate, get_sparsity, is_vnm, sparsify_
from vnm_compile.data import calibration_and_eval_texts
from vnm_compile.models import embed, load_minilm
from vnm_compile.recovery import DistillLoss, RecoveryConfig, length_bucketed_batches, recover_


def merged_is_vnm(linear: torch.nn.Linear) -> bool:
    """The merged weight is a plain Parameter whose non-zeros obey the pattern in the recorded permutations."""
    state = get_sparsity(linear.weight)  # indexed by the merged Parameter itself
    if state is None:
        return get_sparsity(linear) is None  # a layer that was never sparsified
    nonzero = linear.weight.detach() != 0
    return bool((nonzero <= state.mask).all()) and is_vnm(nonzero, state.pattern, state.in_perm, state.out_perm)


def nn_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose nearest other row (cosine; rows are unit vectors) is the same in a and b."""

    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(1)

    return float((nearest(a) == nearest(b)).float().mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pattern", default="64:2:5")
    p.add_argument("--methods", nargs="+", default=["fixed", "srste", "three_stage"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="full fine-tune peak LR (default: RecoveryConfig's)")
    p.add_argument("--lora-lr", type=float, default=None, help="three-stage LoRA peak LR (default: RecoveryConfig's)")
    p.add_argument("--hidden", choices=["last", "all"], default="all", help="distil the last or every hidden state")
    p.add_argument("--srste-interval", type=int, default=50)
    p.add_argument("--n-calibration", type=int, default=256, help="texts used for RIA statistics")
    p.add_argument("--n-eval", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--permute", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--train-embeddings", action="store_true", help="also train the (dense) embedding tables")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/<cpu|gpu>/recovery_minilm)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments are denormal on CPU otherwise: many times slower
    device = "cuda" if torch.cuda.is_available() else "cpu"
    permute = {"on": True, "off": False}[args.permute] if args.permute != "auto" else (
        importlib.util.find_spec("vnm_compile.calibration.permutation") is not None
    )  # fmt: skip

    # 1. Model, data, dense reference embeddings, calibration statistics.
    t_setup = time.perf_counter()
    dense, tok = load_minilm(device=device)
    train_texts, eval_texts = calibration_and_eval_texts(None, args.n_eval)
    train = length_bucketed_batches(tok, train_texts, args.batch_size, args.max_length)
    held_out = length_bucketed_batches(tok, eval_texts, 64, args.max_length)
    ref = embed(dense, held_out)
    stats = calibrate(dense, length_bucketed_batches(tok, train_texts[: args.n_calibration], 32, args.max_length))

    # 2. One-shot pruning.
    pruned = copy.deepcopy(dense)
    report = sparsify_(pruned, VNMConfig(args.pattern, score="ria", permute=permute), stats)
    print(report.summary(), flush=True)

    def evaluate(model) -> dict:
        e = embed(model, held_out)
        return {"cosine": float((e * ref).sum(-1).mean()), "nn_agreement": nn_agreement(e, ref)}

    one_shot = evaluate(pruned)
    setup_s = time.perf_counter() - t_setup
    print(f"one-shot {args.pattern} RIA (permute={permute}): {one_shot}", flush=True)

    # 3. Recovery, each method from the same pruned model, same batches, same shared teacher cache.
    loss = DistillLoss(dense, hidden=args.hidden, cache=True)
    runs = []
    for method in args.methods:
        student = copy.deepcopy(pruned)
        if not args.train_embeddings:
            # The embedding tables are dense and already equal the teacher's: training them only costs time.
            student.embeddings.requires_grad_(False)
        lr = args.lora_lr if method == "three_stage" else args.lr
        config = RecoveryConfig(method=method, steps=args.steps, lr=lr, train_mode=False,
                                srste_interval=args.srste_interval, eval_every=args.eval_every)  # fmt: skip
        t0 = time.perf_counter()
        res = recover_(student, train, config, loss=loss, teacher=dense, stats=stats, eval_fn=evaluate)
        seconds = time.perf_counter() - t0
        ok = all(merged_is_vnm(m) for m in student.modules() if isinstance(m, torch.nn.Linear))
        final = res.final_eval
        runs.append({
            "method": method, "lr": config.peak_lr, "steps": args.steps, "train_seconds": round(res.seconds, 1),
            "total_seconds": round(seconds, 1), "cosine": final["cosine"], "nn_agreement": final["nn_agreement"],
            "merged_weights_vnm": ok, "curve": [e for e in res.evals if not e.get("merged")],
            "final_loss": sum(h["loss"] for h in res.history[-10:]) / min(10, len(res.history)),
        })  # fmt: skip
        print(f"{method}: {final} in {seconds:.0f} s (merged weights V:N:M: {ok})", flush=True)

    # 4. Results.
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / device / "recovery_minilm"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": device, "python": platform.python_version()},  # fmt: skip
        "model": "all-MiniLM-L6-v2", "pattern": args.pattern, "score": "ria", "permute": permute,
        "train_texts": len(train_texts), "train_batches": len(train), "eval_texts": len(eval_texts),
        "batch_size": args.batch_size, "max_length": args.max_length, "distill": args.hidden,
        "train_embeddings": args.train_embeddings,
        "setup_seconds": round(setup_s, 1), "one_shot": one_shot, "runs": runs,
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"# Recovery training: {r['model']} at {r['pattern']} (RIA, permute={r['permute']})",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']['device']} ({r['machine']['cpu']}, {r['machine']['threads']} torch threads), "
        f"torch {r['machine']['torch']}  ",
        f"Training: {r['train_texts']} docstring paragraphs in {r['train_batches']} length-bucketed batches of "
        f"<= {r['batch_size']} (max_length {r['max_length']}), distillation MSE to the dense model's "
        f"{'hidden states of every layer' if r['distill'] == 'all' else 'token embeddings'}; "
        f"evaluation on {r['eval_texts']} held-out paragraphs.",
        "",
        "| method | steps | peak LR | cosine | NN agreement | train s | merged V:N:M |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| one-shot (no training) | 0 | | {r['one_shot']['cosine']:.4f} | {r['one_shot']['nn_agreement']:.4f} | | |",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['method']} | {run['steps']} | {run['lr']:g} | {run['cosine']:.4f} | {run['nn_agreement']:.4f} "
            f"| {run['train_seconds']:.0f} | {run['merged_weights_vnm']} |"
        )
    lines += ["", "Cosine during training (step: cosine):", ""]
    for run in r["runs"]:
        curve = ", ".join(f"{e['step']}: {e['cosine']:.3f}" for e in run["curve"])
        lines.append(f"- {run['method']}: {curve}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
