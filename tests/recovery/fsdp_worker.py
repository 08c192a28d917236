"""One rank of the FSDP2 recovery test (tests/recovery/test_recovery_fsdp.py), launched by torchrun on CPU/gloo.

A tiny MLP with awkward shapes (rows that do not split evenly over the ranks, V-blocks cut by shard
boundaries) is pruned to 8:2:5, sharded with ``fully_shard`` (bf16 mixed precision) and recovery-trained
with fixed masks under AdamW with weight decay. Every evaluation checks, on every rank's shards, that
the pruned weights are exactly zero and the masks are the ones sparsify_ chose. Writes
``<out>/<tag>_rank<r>.json`` and, on rank 0, the gathered final weights ``<out>/<tag>_state.pt``.

    torchrun --nproc-per-node 2 tests/recovery/fsdp_worker.py --tag full --out OUT --ckpt CKPT
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from vnm_compile import VNMConfig, get_sparsity, is_vnm, sparsify_
from vnm_compile.recovery import recover_
from vnm_compile.recovery.distributed import exit_rank
from vnm_compile.recovery.masking import dense_weight, mask_like, sparse_linears

PATTERN = "8:2:5"


class Interrupt(Exception):
    pass


def build() -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """(sparse student, dense teacher, the masks sparsify_ chose); identical on every rank."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(21, 37), nn.GELU(), nn.Dropout(0.2), nn.Linear(37, 29), nn.GELU(), nn.Linear(29, 7))
    model = copy.deepcopy(dense)
    sparsify_(model, VNMConfig(PATTERN, score="abs", permute=True, min_numel=0), progress=False)
    masks = {name: get_sparsity(m).mask.clone() for name, m in sparse_linears(model).items()}
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for i in (0, 3):
        fully_shard(model[i], mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model, dense.eval(), masks


def shards_exact(model: nn.Module, masks: dict[str, torch.Tensor]) -> bool:
    """On this rank: each weight shard is zero wherever its mask shard is, and the masks are sparsify_'s."""
    ok = True
    for name, m in sparse_linears(model).items():
        state = get_sparsity(m)
        w = dense_weight(m)
        local_w, local_m = w.to_local(), mask_like(state.mask, w).to_local()
        ok &= bool(torch.equal(state.mask, masks[name])) and is_vnm(
            state.mask, state.pattern, state.in_perm, state.out_perm
        )
        ok &= bool((local_w[~local_m] == 0).all()) and local_w.shape == local_m.shape
    return ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tag", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interrupt-after", type=int, default=0, help="stop at the evaluation after this step")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, teacher, masks = build()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    data = [torch.randn(12, 21, generator=g) for _ in range(5)]
    checks: list[dict] = []

    def check(model: nn.Module) -> dict:
        exact = shards_exact(model, masks)
        checks.append({"exact": exact})
        if args.interrupt_after and len(checks) * 2 >= args.interrupt_after:
            raise Interrupt
        return {"exact": float(exact)}

    record: dict = {"rank": rank, "world": dist.get_world_size()}
    try:
        res = recover_(model, data, method="fixed", steps=args.steps, lr=1e-2, weight_decay=0.1, seed=7,
                       checkpoint_every=4, eval_every=2, teacher=teacher, eval_fn=check,
                       checkpoint_dir=args.ckpt, progress=False)  # fmt: skip
        record.update(resumed_from=res.resumed_from, losses=[h["loss"] for h in res.history])
    except Interrupt:
        record["interrupted"] = True
    record["checks"] = checks
    record["final_exact"] = shards_exact(model, masks)
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, Path(args.out) / f"{args.tag}_state.pt")
    (Path(args.out) / f"{args.tag}_rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_rank(0)  # no interpreter teardown: a finished gloo rank has aborted in it (exit_rank)
