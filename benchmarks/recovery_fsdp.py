"""Recovery training under FSDP2: a Llama-2-7B-shaped model (random weights), 64:2:5, fixed masks, torchrun.

The dense model's last hidden states on a fixed set of random token batches (each rank its own) are
the targets; the model is pruned (``sparsify_``), sharded with ``fully_shard`` per decoder layer (bf16
parameters and compute, fp32 gradient reduction and master weights) and trained with ``recover_``
(AdamW, fixed masks) to match them, so the loss must fall. Two passes over the same steps:

1. an uninterrupted run of ``--steps`` steps that writes a sharded checkpoint (torch.distributed.checkpoint)
   at step ``--checkpoint-at`` (timed by recover_: ``RecoveryResult.checkpoints``);
2. a fresh model (built, pruned and sharded the same way) resumed from that checkpoint by ``recover_``
   (timed: ``RecoveryResult.resume_seconds``), trained to the end: its losses and final weights are
   compared bit for bit with pass 1.

Every evaluation (``--eval-every``) checks on every rank that each weight shard is zero wherever its
mask shard is and that the masks are the ones sparsify_ chose. Reports tokens/s per GPU, peak memory per
GPU, the loss curve and the checkpoint times.

    # one GPU, 8 layers (1.75 B parameters: full fine-tuning fits one H100, about 30 GB of states):
    torchrun --nproc-per-node 1 benchmarks/recovery_fsdp.py --layers 8 --steps 300
    # the same with deterministic algorithms (is the GPU resume then bit for bit?):
    torchrun --nproc-per-node 1 benchmarks/recovery_fsdp.py --layers 8 --steps 300 --deterministic
    # two GPUs, all 32 layers (issue 28; NVLink multicast stays off, see MULTICAST_OFF):
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc-per-node 2 benchmarks/recovery_fsdp.py --layers 32 --steps 300
    # CPU / gloo check of the whole flow with a tiny model:
    torchrun --nproc-per-node 2 benchmarks/recovery_fsdp.py --tiny --steps 12 --out /tmp/fsdp_tiny

Rank 0 records the environment (kernels.benchmark.environment) and writes (save_results, and the loss plot)
benchmarks/results/<gpu>[-x<world>]/recovery_fsdp_<layers>l.{json,md,png}, or --out's stem .{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vnm_compile import VNMConfig, calibrate, get_sparsity, sparsify_
from vnm_compile.kernels.benchmark import LLAMA_SHAPES, environment, markdown_header, save_results_at
from vnm_compile.recovery import RecoveryConfig, recover_
from vnm_compile.recovery.distributed import exit_rank
from vnm_compile.recovery.masking import dense_weight, mask_like, set_mask_, sparse_linears

# NVLink multicast stays off on the shared GPU hosts (a program using it can take their GPUs out of
# service); FSDP needs none of it. Set before NCCL starts, unless the environment already says.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# LlamaConfig's names of LLAMA_SHAPES' fields: hidden, intermediate, attention heads, KV heads, vocab
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
LLAMA2_7B = dict(zip(SHAPE_KEYS, LLAMA_SHAPES["llama2-7b"], strict=True))
TINY = dict(zip(SHAPE_KEYS, (128, 344, 4, 4, 1000), strict=True))


class Stop(Exception):
    pass


def log(*a) -> None:
    if dist.get_rank() == 0:
        print(*a, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device: torch.device):
    """(sharded sparse model, batches with their dense targets, the sparsify_ masks, set-up seconds)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import LlamaConfig, LlamaModel

    t0 = time.perf_counter()
    shape = TINY if args.tiny else LLAMA2_7B
    config = LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=max(4096, args.seq),
                         attn_implementation="sdpa")  # fmt: skip
    torch.manual_seed(0)  # identical weights on every rank
    with torch.device(device):
        model = LlamaModel(config)
    args.params = sum(p.numel() for p in model.parameters())
    # 1. Targets: the dense model's last hidden states (bf16 autocast, as the student computes), each rank its own.
    g = torch.Generator().manual_seed(1000 + dist.get_rank())
    ids = [torch.randint(0, shape["vocab_size"], (args.batch, args.seq), generator=g) for _ in range(args.n_batches)]
    data = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for x in ids:
            x = x.to(device)
            data.append((x, model(input_ids=x, use_cache=False).last_hidden_state.to(torch.bfloat16)))
    # 2. Prune (each rank the same masks from the same weights); full masks to the CPU.
    stats = calibrate(model, [(x,) for x, _ in data[:4]], progress=False) if args.score != "abs" else None
    sparsify_(model, VNMConfig(args.pattern, score=args.score, permute=False), stats, progress=False)
    masks = {}
    for name, m in sparse_linears(model).items():
        set_mask_(m, get_sparsity(m).mask.cpu())
        masks[name] = get_sparsity(m).mask
    # 3. Shard: each decoder layer, then the root (embeddings, final norm); bf16 params, fp32 reduction.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable()
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    sync(device)
    return model, data, masks, time.perf_counter() - t0


def masks_exact(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """On every rank: weight shards zero wherever their mask shards are, masks equal to sparsify_'s (all-reduced)."""
    ok = True
    for name, m in sparse_linears(model).items():
        w = dense_weight(m)
        state = get_sparsity(m)
        local_w, local_m = w.to_local(), mask_like(state.mask, w).to_local()
        ok &= bool(torch.equal(state.mask, masks[name])) and bool((local_w[~local_m] == 0).all())
    flag = torch.tensor([int(ok)], device=dense_weight(next(iter(sparse_linears(model).values()))).to_local().device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def shard_digest(model: nn.Module) -> dict[str, str]:
    """Per parameter, a digest of this rank's shard, bit for bit (two runs on the same ranks compared).

    On its device: the sum and a position-weighted sum of its bit patterns (integers, wrapping), so any
    changed bit changes the digest with near certainty; then sha1 over those.
    """
    out = {}
    for name, p in model.named_parameters():
        local = (p.to_local() if hasattr(p, "to_local") else p).detach().contiguous().flatten()
        bits = local.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[local.element_size()]).long()
        weights = torch.arange(bits.numel(), device=bits.device) % 65521 + 1
        out[name] = hashlib.sha1(f"{int(bits.sum())}:{int((bits * weights).sum())}".encode()).hexdigest()
    return out


class TimedLoss:
    """MSE to the dense targets; records when each step's forward starts (steps' wall times, synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.starts = device, []

    def __call__(self, model: nn.Module, batch) -> torch.Tensor:
        sync(self.device)
        self.starts.append(time.perf_counter())
        ids, target = batch
        return F.mse_loss(model(input_ids=ids, use_cache=False).last_hidden_state.float(), target.float())


def run(args, device, ckpt: Path, phase: int) -> dict:
    model, data, masks, setup_s = build(args, device)
    log(f"phase {phase}: built, pruned and sharded in {setup_s:.1f} s")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss = TimedLoss(device)
    checks = []

    def check(m: nn.Module) -> dict:
        checks.append(masks_exact(m, masks))
        return {"masks_exact": float(checks[-1])}

    # train mode: HF checkpoints activations only in training; Llama has no dropout, so it computes the same.
    config = RecoveryConfig(method="fixed", steps=args.steps, lr=args.lr, warmup=0.05, train_mode=True,
                            checkpoint_every=args.checkpoint_at, eval_every=args.eval_every, seed=0)  # fmt: skip
    t_call = time.perf_counter()
    res = recover_(model, data, config, loss=loss, checkpoint_dir=ckpt, eval_fn=check, progress=dist.get_rank() == 0)
    sync(device)
    t_end = time.perf_counter()
    out = {
        "setup_s": round(setup_s, 2), "resumed_from": res.resumed_from, "resume_s": round(res.resume_seconds, 3),
        "save_s": [round(c["seconds"], 3) for c in res.checkpoints],
        "losses": [h["loss"] for h in res.history], "masks_exact": checks,
        "start_to_first_step_s": round(loss.starts[0] - t_call, 3),
        "step_s": [b - a for a, b in zip(loss.starts, loss.starts[1:], strict=False)] + [t_end - loss.starts[-1]],
        "digest": shard_digest(model),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }  # fmt: skip
    if phase == 1:
        folder = ckpt / f"step_{args.checkpoint_at:08d}"
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.iterdir()) if dist.get_rank() == 0 else 0
    del model, data, res
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="a tiny Llama (hidden 128) for CPU checks")
    p.add_argument("--pattern", default="64:2:5")
    p.add_argument("--score", default="abs", choices=["abs", "wanda", "ria"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-at", type=int, default=None, help="checkpoint step (default 2/3 of the steps)")
    p.add_argument("--eval-every", type=int, default=None, help="mask checks every this many steps (default steps/6)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--n-batches", type=int, default=16, help="fixed random batches per rank (the task)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every decoder layer")
    p.add_argument("--ckpt-dir", default=None, help="checkpoint folder (default: a fresh one under /tmp)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/<gpu>[-x<world>]/...)")
    p.add_argument(
        "--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms (warn only) and a fixed cuBLAS workspace: whether the resumed run "
        "is then bit for bit the uninterrupted one on a GPU (it is on the CPU without this)",
    )  # fmt: skip
    args = p.parse_args()
    if args.deterministic:  # before any CUDA work: cuBLAS reads its workspace setting when it starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if args.tiny:
        args.seq = min(args.seq, 64)
    args.checkpoint_at = args.checkpoint_at or max(1, math.ceil(args.steps * 2 / 3))
    if not args.steps // 2 < args.checkpoint_at < args.steps:
        p.error(
            "--checkpoint-at must be over half the steps and before the last (one checkpoint, the one resumed from)"
        )
    args.eval_every = args.eval_every or max(1, args.steps // 6)

    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # rank 0 records the run (the commit when it starts); the other ranks write nothing
    env = environment(device, program=f"torchrun --nproc-per-node {world} ") if rank == 0 else None
    root = Path(args.ckpt_dir or f"/tmp/vnm_recovery_fsdp_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}")
    if rank == 0 and root.exists():
        shutil.rmtree(root)
    dist.barrier()
    log(f"world {world}, {device.type}, {args.layers} layers{' (tiny)' if args.tiny else ''}, {args.pattern}")

    first = run(args, device, root / "ckpt", 1)
    log(f"phase 1: loss {first['losses'][0]:.4g} -> {first['losses'][-1]:.4g}, masks exact {all(first['masks_exact'])}")
    second = run(args, device, root / "ckpt", 2)
    log(f"phase 2: resumed from step {second['resumed_from']}, masks exact {all(second['masks_exact'])}")
    k = args.checkpoint_at
    same_losses = second["losses"][k:] == first["losses"][k:]
    differing = gather(sorted(n for n, d in first["digest"].items() if second["digest"].get(n) != d))
    same_weights = [not names for names in differing]
    firsts, seconds = gather(first), gather(second)
    if rank == 0:
        result = report(args, env, world, firsts, seconds, same_losses, all(same_weights))
        result["resumed_weights_differing"] = sorted({n for names in differing for n in names})
        write(args, world, result)
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def report(args, env: dict, world: int, firsts, seconds, same_losses, same_weights) -> dict:
    tokens = args.batch * args.seq
    # Steady steps: no warm-up, none with a checkpoint or a mask check after it.
    steady = [
        s for i, s in enumerate(firsts[0]["step_s"]) if (i + 1) % args.eval_every and i + 1 != args.checkpoint_at
    ][3:]
    step_s = statistics.median(steady) if steady else float("nan")
    return {
        "command": env["command"], "machine": {"device": env["gpu"], "world": world}, "environment": env,
        "model": ("tiny Llama" if args.tiny else "Llama-2-7B-shaped") + f", {args.layers} layers, random weights",
        "params": args.params, "pattern": args.pattern, "score": args.score, "method": "fixed",
        "steps": args.steps, "checkpoint_at": args.checkpoint_at, "batch_per_rank": args.batch, "seq": args.seq,
        "lr": args.lr, "grad_ckpt": args.grad_ckpt, "precision": "bf16 params/compute, fp32 reduce + AdamW state",
        "deterministic": args.deterministic,
        "median_step_s": step_s, "tokens_per_s_per_gpu": tokens / step_s,
        "peak_mem_gib_per_gpu": [f["peak_mem_gib"] for f in firsts],
        "peak_mem_gib_per_gpu_resumed": [s["peak_mem_gib"] for s in seconds],
        "setup_s": firsts[0]["setup_s"], "save_s": max(f["save_s"][0] for f in firsts),
        "checkpoint_bytes_rank0": firsts[0]["checkpoint_bytes"],
        "resume_s": max(s["resume_s"] for s in seconds),
        "resume_start_to_first_step_s": seconds[0]["start_to_first_step_s"],
        "fresh_start_to_first_step_s": firsts[0]["start_to_first_step_s"],
        "loss_first_last": [firsts[0]["losses"][0], firsts[0]["losses"][-1]],
        "masks_exact_every_check": all(all(f["masks_exact"]) for f in firsts + seconds),
        "checks": [len(f["masks_exact"]) for f in firsts + seconds],
        "resumed_losses_bit_for_bit": same_losses, "resumed_weights_bit_for_bit": same_weights,
        "losses_rank0": firsts[0]["losses"], "resumed_losses_rank0": seconds[0]["losses"],
    }  # fmt: skip


def write(args, world: int, r: dict) -> None:
    if args.out:
        out = Path(args.out)
    else:
        from vnm_compile.kernels.dispatch import results_dir

        slug = r["environment"].get("gpu_slug", "cpu") + (f"-x{world}" if world > 1 else "")
        out = results_dir() / slug / f"recovery_fsdp_{args.layers}l"
    mem = ", ".join(f"{m:.1f}" for m in r["peak_mem_gib_per_gpu"] if m is not None) or "n/a (CPU)"
    title = (f"Recovery under FSDP2: {r['model']} ({r['params'] / 1e9:.2f} B parameters), {r['pattern']}, fixed masks, "
             f"{r['machine']['world']} rank(s)")  # fmt: skip
    md = [
        markdown_header(title, r["environment"]),
        f"Task: MSE to the dense model's last hidden states on {args.n_batches} fixed random token batches per rank "
        f"({r['batch_per_rank']} x {r['seq']} tokens), AdamW lr {r['lr']:g}, {r['precision']}"
        + (
            "; deterministic algorithms (torch.use_deterministic_algorithms, warn only)." if r["deterministic"] else "."
        ),
        "",
        "| steps | tokens/s per GPU | median step s | peak memory per GPU (GiB) | loss first -> last | save s "
        "| resume s | masks exact (every check, every rank) | resumed bit-for-bit (losses / weights) |",
        "|---:|---:|---:|---|---|---:|---:|---|---|",
        f"| {r['steps']} | {r['tokens_per_s_per_gpu']:.0f} | {r['median_step_s']:.3f} | {mem} "
        f"| {r['loss_first_last'][0]:.4g} -> {r['loss_first_last'][1]:.4g} | {r['save_s']:.2f} "
        f"| {r['resume_s']:.2f} | {r['masks_exact_every_check']} "
        f"| {r['resumed_losses_bit_for_bit']} / {r['resumed_weights_bit_for_bit']} |",
        "",
        f"Checkpoint at step {r['checkpoint_at']} (sharded, torch.distributed.checkpoint, weights + AdamW state + "
        f"masks; {r['checkpoint_bytes_rank0'] / 2**30:.2f} GiB in the folder); save s / resume s: recover_'s timing "
        "of writing it and of reading it into a fresh model and optimizer (slowest rank); recover_ called to its "
        f"first step: {r['resume_start_to_first_step_s']:.2f} s resumed, {r['fresh_start_to_first_step_s']:.2f} s "
        f"fresh. Set-up (build, dense targets, prune, shard): {r['setup_s']:.1f} s.",
    ]
    if r.get("resumed_weights_differing"):
        md += ["", "Parameters whose final shards differ between the two runs: "
               + ", ".join(f"`{n}`" for n in r["resumed_weights_differing"]) + "."]  # fmt: skip
    save_results_at(out, r, "\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(r["losses_rank0"]) + 1), r["losses_rank0"], label="uninterrupted")
    k = r["checkpoint_at"]
    ax.plot(range(k + 1, len(r["resumed_losses_rank0"]) + 1), r["resumed_losses_rank0"][k:], "--", label="resumed")
    ax.axvline(k, color="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE to dense hidden states (rank 0)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"{r['model']}, {r['pattern']}, FSDP2 x{r['machine']['world']}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    exit_rank(main())  # no interpreter teardown: a finished gloo rank has aborted in it (exit_rank)
