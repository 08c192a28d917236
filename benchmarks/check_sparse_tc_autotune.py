"""Check (GPU, ~20 s): sparse_tc_linear's decode autotuning against the fixed default config, same run.

    python benchmarks/check_sparse_tc_autotune.py       # writes $OUT/tune.txt (default /tmp)

Four (shape, pattern, token count) cases: the fixed default (default_decode_config) and the autotuned
op (first call times sparse_tc.decode_candidates, later calls reuse the cached choice), both under CUDA
graphs with weight copies > 3x L2, the output checked against float32 first.
"""

import dataclasses
import os
import time
from pathlib import Path

import torch

from vnm_compile.format import VNMWeight
from vnm_compile.kernels.benchmark import _copies, time_graph
from vnm_compile.kernels.sparse_tc import default_decode_config, pack_sparse_tc, sparse_tc_linear
from vnm_compile.kernels.vnm_triton import autotune_cache
from vnm_compile.masks import vnm_mask
from vnm_compile.pattern import VNMPattern

dev = torch.device("cuda")
t0 = time.time()
lines = []
for rows, cols, pat, tokens in [
    (4096, 4096, "64:2:16", 8),
    (4096, 4096, "64:2:8", 16),
    (11008, 4096, "64:2:8", 1),
    (4096, 11008, "64:2:5", 4),
]:
    p = VNMPattern.parse(pat)
    weight = (torch.randn(rows, cols, device=dev) / cols**0.5).half()
    w = VNMWeight.from_dense(weight, vnm_mask(weight.abs().float(), p), p)
    x = torch.randn(tokens, cols, device=dev).half()
    ref = x.float() @ w.to_dense().float().t()
    packed = pack_sparse_tc(w)
    copies = [packed] + [
        dataclasses.replace(packed, records=packed.records.clone(), columns=packed.columns.clone())
        for _ in range(_copies(packed.nbytes, dev) - 1)
    ]
    d = default_decode_config(tokens)
    fixed = time_graph([lambda pk=pk, x=x, d=d: sparse_tc_linear(x, pk, None, d) for pk in copies])
    y = sparse_tc_linear(x, packed)  # first call: autotunes
    err = ((y.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise SystemExit(f"wrong: {rows}x{cols} {pat} {tokens} tokens, relative error {err}")
    tuned = time_graph([lambda pk=pk, x=x: sparse_tc_linear(x, pk) for pk in copies])
    chosen = [v for k, v in autotune_cache().items() if k[0] == "sparse_tc_decode" and k[3:5] == (rows, cols)]
    lines.append(
        f"{rows}x{cols} {pat} {tokens} tok: fixed default {fixed:.1f} us, autotuned {tuned:.1f} us "
        f"({fixed / tuned:.2f}x) err {err:.1e} chosen {chosen}"
    )
    print(lines[-1])
Path(os.environ.get("OUT", "/tmp"), "tune.txt").write_text("\n".join(lines) + "\n")
print(f"{time.time() - t0:.0f} s")
