"""Launch the mma.sp kernels once per tile config on one layer, for a profiler (Nsight Compute).

    ncu --clock-control none -k regex:vnm_mma_sp --set full -o prof python benchmarks/profile_sparse_tc.py
    ncu --import prof.ncu-rep --page source --print-source sass    # per-instruction counts and stalls

Each config runs twice (a warm-up that compiles and probes, then the launch to profile); the configs are
bench_sparse_tc.CONFIGS or the ones given with --config (KEY=VALUE,... e.g. KERNEL=dense,WR=4,WN=1,NT=8,
STAGES=4,KSUB=1,MINB=2; the Hopper kernel: KERNEL=wgmma,WG=2,TNW=256,WST=4). The decode kernel takes x token-major, up to 32 tokens:

    ncu --clock-control none -k regex:vnm_mma_sp_decode --set full python benchmarks/profile_sparse_tc.py \
        --tokens 1 --config KERNEL=decode,DW=8,DU=2,CTAS_PER_SM=2,XS=0
"""

from __future__ import annotations

import argparse
import math

from bench_sparse_tc import parse_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="out x in features")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--pattern", default="64:2:8")
    parser.add_argument("--config", action="append", type=parse_config, default=None)
    args = parser.parse_args(argv)

    import torch
    from bench_sparse_tc import CONFIGS, launch

    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels.sparse_tc import feature_major, launch_decode, pack_sparse_tc
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    rows, cols = map(int, args.shape.split("x"))
    p = VNMPattern.parse(args.pattern)
    weight = (torch.randn(rows, cols, device="cuda") / math.sqrt(cols)).half()
    x = torch.randn(args.tokens, cols, device="cuda").half()
    packed = pack_sparse_tc(VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p))
    y = torch.empty(args.tokens, rows, device="cuda", dtype=torch.half)
    for cfg in args.config or CONFIGS:
        if cfg.get("KERNEL") == "decode":  # x as it is (token-major), up to 32 tokens
            for _ in range(2):
                launch_decode(x, packed, y, None, cfg)
            torch.cuda.synchronize()
            print(cfg)
            continue
        xt = feature_major(x, packed, cfg)
        for _ in range(2):
            launch(cfg, xt, args.tokens, packed, y)
        torch.cuda.synchronize()
        print(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
