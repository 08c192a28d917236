"""Peak host memory of ``load_compressed``: a compressed checkpoint loaded into a model built on the meta
device, measured in a fresh process.

    python benchmarks/bench_load_host.py --linears 24 --device cpu     # ~1 GB checkpoint (64:2:5)
    python benchmarks/bench_load_host.py --linears 24 --device cuda

The checkpoint: ``--linears`` Llama-2-7B MLP-shaped linears (gate / up 11008x4096, down 4096x11008, in that
order), fp16, pruned at ``--pattern`` with random input and output permutations, compressed row-major
(``save_compressed``'s portable layout: every device loads it), one shard (``--shard-gb``). Two weights are
pruned; the other linears hold copies of them (the bytes are what matters here).

The child process imports everything and builds the meta model, then resets the peak resident set
(``/proc/self/clear_refs``) and loads. Reported: the peak resident set's growth during the load (VmHWM after
minus VmRSS before; file pages mapped from the checkpoint count, as they do against a machine's memory), the
bytes the loaded model holds on the host (0 for a GPU target), and the difference: the loader's own
overhead. Linux only. Writes load_host_<device>.json/.md to --out (default benchmarks/results/cpu/ for a CPU
target, benchmarks/results/<gpu>/ for a GPU one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vnm_compile.kernels.benchmark import llama_linears, markdown_header

_, _GATE_UP, _DOWN = (shape[:2] for shape in llama_linears())  # Llama-2-7B
SHAPES = (_GATE_UP, _GATE_UP, _DOWN)
NAMES = ("gate_proj", "up_proj", "down_proj")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _model(linears: int, device: str):
    """Llama MLPs: blocks of gate_proj, up_proj, down_proj (gate/up are siblings: one storage once loaded)."""
    import torch
    from torch import nn

    blocks = nn.ModuleList()
    with torch.device(device):
        for i in range(linears):
            if i % 3 == 0:
                blocks.append(nn.Module())
            lin = nn.Linear(*SHAPES[i % 3][::-1], bias=False, dtype=torch.float16)
            blocks[-1].add_module(NAMES[i % 3], lin)
    return blocks


def build(args) -> int:
    """Write the checkpoint to args.ckpt; returns its bytes."""
    import torch

    from vnm_compile import VNMPattern, VNMWeight, vnm_mask
    from vnm_compile.deploy import VNMLinear, save_compressed

    p = VNMPattern.parse(args.pattern)
    gen = torch.Generator().manual_seed(0)
    made = {}
    for shape in set(SHAPES):
        w = torch.randn(shape, generator=gen).half()
        made[shape] = (
            VNMWeight.from_dense(w, vnm_mask(w.float().abs(), p), p),
            torch.randperm(shape[1], generator=gen),
            torch.randperm(shape[0], generator=gen),
        )
    model = _model(args.linears, "meta")
    for i in range(args.linears):
        w, in_perm, out_perm = made[SHAPES[i % 3]]
        copy = VNMWeight(w.values.clone(), w.columns.clone(), w.meta.clone(), None, w.pattern, w.shape)
        new = VNMLinear.from_weight(copy, in_perm=in_perm, out_perm=out_perm, layout="rows")
        model[i // 3].add_module(NAMES[i % 3], new)
    save_compressed(model, args.ckpt, max_shard_size=int(args.shard_gb * 2**30))
    return sum(f.stat().st_size for f in Path(args.ckpt).iterdir())


def child(args) -> dict:
    """Load args.ckpt into a meta model; the peak resident set during the load."""
    import torch

    from vnm_compile.deploy import load_compressed

    model = _model(args.linears, "meta")
    if args.device == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context before the baseline
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        reset = False
    before, hwm0 = _status("VmRSS"), _status("VmHWM")
    t0 = time.perf_counter()
    load_compressed(model, args.ckpt, device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()] if t.device.type == "cpu"}  # fmt: skip
    held = sum(storages.values())
    peak = _status("VmHWM")
    return {
        "peak_growth_bytes": peak - before,
        "host_model_bytes": held,
        "overhead_bytes": peak - before - held,
        "load_s": load_s,
        "peak_was_reset": reset,
        "hwm_before_bytes": hwm0,
    }


def _md(r: dict) -> str:
    mb = 2**20
    return (
        markdown_header(f"load_compressed peak host memory ({r['device']})", r["environment"])
        + f"\nCheckpoint (safetensors {r['versions']['safetensors']}): {r['linears']} linears (gate/up {_GATE_UP[0]}x{_GATE_UP[1]}, down {_DOWN[0]}x{_DOWN[1]}) at "
        f"{r['pattern']}, fp16, random permutations, {r['checkpoint_bytes'] / mb:.0f} MiB in {r['shards']} shard(s).\n\n"
        "| peak RSS growth MiB | model on host MiB | loader overhead MiB | load s | GB/s |\n|---|---|---|---|---|\n"
        f"| {r['peak_growth_bytes'] / mb:.0f} | {r['host_model_bytes'] / mb:.0f} | {r['overhead_bytes'] / mb:.0f} | "
        f"{r['load_s']:.2f} | {r['checkpoint_bytes'] / r['load_s'] / 1e9:.2f} |\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--linears", type=int, default=24, help="a multiple of 3 (whole MLPs)")
    parser.add_argument("--pattern", default="64:2:5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-gb", type=float, default=4.0)
    parser.add_argument("--tmp", default=None, help="folder for the checkpoint (default: the system's temp)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", dest="ckpt_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.linears % 3:
        parser.error("--linears must be a multiple of 3")
    if args.ckpt_child:
        args.ckpt = args.ckpt_child
        print(json.dumps(child(args)))
        return 0
    import safetensors

    from vnm_compile.kernels.benchmark import environment, save_results, versions

    env = environment(args.device, program="python ")  # the commit when the run starts
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        args.ckpt = tmp
        size = build(args)
        shards = len(list(Path(tmp).glob("*.safetensors")))
        cmd = [sys.executable, __file__, "--child", tmp, "--linears", str(args.linears), "--device", args.device]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(run.stdout.strip().splitlines()[-1])
    result.update(
        device=args.device, pattern=args.pattern, linears=args.linears, checkpoint_bytes=size, shards=shards,
        versions={**versions(env), "safetensors": safetensors.__version__}, environment=env,
    )  # fmt: skip
    if args.out is None:
        from vnm_compile.kernels.dispatch import results_dir

        args.out = results_dir() / env.get("gpu_slug", "cpu")
    save_results(args.out, f"load_host_{args.device}", result, _md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
