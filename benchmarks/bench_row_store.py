"""Where should a permuted layer's permutations go: an index op beside the op, or inside the kernels?

    python benchmarks/bench_row_store.py                       # Llama-3-8B shapes, 64:2:8 and 64:2:5, 1/16/2048 tokens
    python benchmarks/bench_row_store.py --tokens 1 16 256 2048 8192 --patterns 64:2:8

For each shape, pattern and token count, the sparse path of vnm::compressed_linear (sparse-tensor-core
layout) is timed three ways under CUDA graphs (median, kernels.benchmark.time_graph): alone (no output
permutation: the floor), followed by ``index_select`` of its output with a random permutation (what
lower_linears emits and inductor fuses into the consumer as a gather), and with that permutation as the op's
row_index (the kernels store each output row at its place: store_out_permutations). The input permutation
two ways: ``index_select`` of x with a random permutation before the op on the weight held in permuted
coordinates (the index op lower_linears emits, unfused here: in a model inductor fuses it into the op
producing x), and folded into the kernels' column indices (the same weight with absolute columns: the
kernels gather x's kept columns through it, no index op; compact records, which tell the op so). cuBLAS on
the dense weight is the reference. Writes row_store.json / .md to --out (default benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _cases(sparse, x, weight, spec, row_index, inverse, masked, in_perm, folded) -> dict:
    """The six timed calls of one (layer, pattern, tokens) point."""
    return {
        "cublas_us": lambda: torch.nn.functional.linear(x, masked),
        "sparse_us": lambda: sparse(x, weight, spec, None),
        "sparse_index_op_us": lambda: sparse(x, weight, spec, None).index_select(-1, inverse),
        "sparse_row_store_us": lambda: sparse(x, [*weight, row_index], spec, None),
        "x_index_op_sparse_us": lambda: sparse(x.index_select(-1, in_perm), weight, spec, None),
        "folded_x_us": lambda: sparse(x, folded, spec, None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3-8b")
    parser.add_argument("--patterns", nargs="+", default=["64:2:8", "64:2:5"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 2048])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_row_store needs a CUDA GPU", file=sys.stderr)
        return 1
    from vnm_compile.format import VNMWeight
    from vnm_compile.kernels import compressed as C
    from vnm_compile.kernels.benchmark import LLAMA_SHAPES, command_line, environment, save_results, time_graph
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir
    from vnm_compile.kernels.sparse_tc import pack_sparse_tc
    from vnm_compile.masks import vnm_mask
    from vnm_compile.pattern import VNMPattern

    hidden, inter, heads, kv = LLAMA_SHAPES[args.shapes][:4]
    qkv = hidden + 2 * hidden * kv // heads
    shapes = [(qkv, hidden, "q/k/v"), (hidden, hidden, "o"), (2 * inter, hidden, "gate/up"), (hidden, inter, "down")]
    dev, dtype = torch.device("cuda"), torch.float16
    rows = []
    for out, in_f, name in shapes:
        gen = torch.Generator(device=dev).manual_seed(out + in_f)
        dense = torch.randn(out, in_f, device=dev, dtype=dtype, generator=gen)
        perm = torch.randperm(out, device=dev, generator=gen)
        in_perm = torch.randperm(in_f, device=dev, generator=gen)
        for p in args.patterns:
            pattern = VNMPattern.parse(p)
            mask = vnm_mask(dense.abs().float(), pattern)  # obeys the pattern as it stands, and on x[:, in_perm]:
            w = VNMWeight.from_dense(dense, mask, pattern)
            packed = pack_sparse_tc(w)
            weight, spec = [packed.records, packed.columns], [C.LAYOUT_TC, w.block_rows, pattern.n, pattern.m, out]
            orig = torch.empty_like(dense)  # the same layer in original input order: W[:, inverse(in_perm)]
            orig[:, in_perm] = dense * mask
            fw = VNMWeight.from_dense(orig, orig != 0, pattern, in_perm=in_perm)
            fpacked = pack_sparse_tc(fw, compact=True)  # compact records: the op then knows the columns are absolute
            folded = [fpacked.records, fpacked.columns]
            row_index = torch.full((packed.records.shape[0] * 64,), -1, dtype=torch.int32, device=dev)
            row_index[:out] = perm.to(torch.int32)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(out, device=dev)
            masked = C.rebuild_dense(weight, spec, in_f, dtype)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_f, device=dev, dtype=dtype, generator=gen)
                plain = C._sparse(x, weight, spec, None)
                got = C._sparse(x, [*weight, row_index], spec, None)
                assert torch.equal(got, plain.index_select(-1, inverse)), (
                    f"{name} {p} {tokens}: row_index store differs from the index op"
                )
                xo = torch.empty_like(x)  # x in original order: x = xo[:, in_perm]
                xo[:, in_perm] = x
                want = plain.float()
                err = ((C._sparse(xo, folded, spec, None).float() - want).norm() / want.norm()).item()
                assert err <= 1e-3, f"{name} {p} {tokens}: folded columns differ from the permuted x by {err:.1e}"
                cases = _cases(C._sparse, xo, weight, spec, row_index, inverse, masked, in_perm, folded)
                rec = {"layer": name, "out": out, "in": in_f, "pattern": p, "tokens": tokens}
                rec.update({k: time_graph([fn]) for k, fn in cases.items()})
                print(rec, flush=True)
                rows.append(rec)
    result = {"environment": environment(dev, dtype), "command": command_line("python "), "rows": rows}
    lines = [f"# Permutations: index ops or inside the kernels ({result['environment']['gpu']})", "",
             f"`{result['command']}`", "",
             "| layer | pattern | tokens | cuBLAS us | sparse us | + index op us | row store us | store vs index op "
             "| x index op + sparse us | folded x us | folded vs x index op |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['layer']} {r['out']}x{r['in']} | {r['pattern']} | {r['tokens']} | {r['cublas_us']:.1f} | "
                     f"{r['sparse_us']:.1f} | {r['sparse_index_op_us']:.1f} | {r['sparse_row_store_us']:.1f} | "
                     f"{r['sparse_index_op_us'] / r['sparse_row_store_us']:.2f}x | {r['x_index_op_sparse_us']:.1f} | "
                     f"{r['folded_x_us']:.1f} | {r['x_index_op_sparse_us'] / r['folded_x_us']:.2f}x |")  # fmt: skip
    save_results(args.out or results_dir() / gpu_slug(), "row_store", result, "\n".join(lines) + "\n", echo=False)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
