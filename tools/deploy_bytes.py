"""Exact bytes of a compressed Llama-2-7B decoder layer, per stored tensor, and what each possible narrowing
of the sparse-tensor-core layout would save (no GPU needed: the modules are built on the meta device).

    python tools/deploy_bytes.py [--patterns 64:2:5 64:2:8] [--out FILE.md]

Rows: ``VNMLinear`` as ``compress_`` builds it (layout "rows", "tc" and "tc-compact", random input and output permutations
as bench_deploy.py prunes them: q/k/v and gate/up share one input permutation tensor) and
``format.compressed_nbytes`` (values + columns + meta of the row-major form). Then the "tc" layout without
parts the kernels read today (each a kernel change): the records' 32 local x^T rows (read only by the mma.sp
"dense" GEMM, which Hopper's default wgmma path does not use), the kept columns as uint8 group-local indices
instead of int16 absolute ones, the k-steps padded to a multiple of 1 instead of 2, and the permutations as
int32 without the inverse output permutation kept beside them.

--out FILE.md: the tables with the command and the environment on top (kernels.benchmark.save_results; the
bytes also as FILE.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vnm_compile.deploy import VNMLinear
from vnm_compile.format import compressed_nbytes
from vnm_compile.kernels.benchmark import environment, llama_linears, markdown_header, save_results_at
from vnm_compile.pattern import VNMPattern

_QKVO, _GATE_UP, _DOWN = (shape[:2] for shape in llama_linears())  # (out, in); no GQA: k/v as wide as q
# (name, out_features, in_features, input-permutation group): one Llama-2-7B decoder layer
LAYER = [("q_proj", *_QKVO, "qkv"), ("k_proj", *_QKVO, "qkv"), ("v_proj", *_QKVO, "qkv"), ("o_proj", *_QKVO, "o"),
         ("gate_proj", *_GATE_UP, "gu"), ("up_proj", *_GATE_UP, "gu"), ("down_proj", *_DOWN, "down")]  # fmt: skip
DENSE = sum(o * i * 2 for _, o, i, _ in LAYER)


def _tc(out_f: int, in_f: int, p: VNMPattern, *, words: int = 584, col_bytes: int = 2, step_multiple: int = 2) -> int:
    """Records + kept columns of one weight in the sparse-tensor-core layout (pack_sparse_tc's shapes)."""
    blocks, groups = -(-out_f // 64), -(-in_f // p.m)
    steps = -(-groups // (8 * step_multiple)) * step_multiple
    return blocks * steps * (words * 4 + 32 * col_bytes)


def _perms(int_bytes: int, inverse: bool) -> int:
    """The layer's permutations: one input permutation per group, an output permutation per linear (and its
    inverse, the non-persistent buffer the forward reads)."""
    ins = {g: i for _, _, i, g in LAYER}
    return int_bytes * (sum(ins.values()) + sum(o for _, o, _, _ in LAYER) * (2 if inverse else 1))


def layer_rows(p: VNMPattern) -> list[tuple[str, int]]:
    """(what, bytes of one decoder layer's linears)."""
    mods = {
        layout: [VNMLinear(i, o, p, bias=False, dtype=torch.float16, device="meta", layout=layout, in_permuted=True,
                           out_permuted=True) for _, o, i, _ in LAYER]
        for layout in ("rows", "tc", "tc-compact")
    }  # fmt: skip
    perms = _perms(8, inverse=True)  # int64 in_perm (shared per group), out_perm and its inverse
    header = sum(m.vnm_header.numel() * 8 for m in mods["tc"])
    weights = {k: sum(sum(t.numel() * t.element_size() for t in m._weight_tensors()) for m in ms)
               for k, ms in mods.items()}  # fmt: skip
    fmt = sum(compressed_nbytes(o, i, p, torch.float16) for _, o, i, _ in LAYER)
    values_meta = sum(
        -(-o // 64) * 64 * (-(-i // p.m)) * (2 * 2 + 0.5) for _, o, i, _ in LAYER
    )  # the kept values and their 2-bit positions alone, no padding of the last k-step
    rows = [
        ("values + 2-bit positions only (the format's floor)", int(values_meta)),
        ("format.compressed_nbytes (values, int16 columns, meta)", fmt),
        ("rows layout + permutations (int64, in shared per group)", weights["rows"] + perms + header),
        ("tc layout as stored today + permutations", weights["tc"] + perms + header),
        ("tc-compact layout (576-word records, k-steps padded to 1) + permutations",
         weights["tc-compact"] + perms + header),
        ("  tc records without the 32 local x^T rows (576 words)", sum(_tc(o, i, p, words=576) for _, o, i, _ in LAYER)
         + perms + header),
        ("  ... and kept columns as uint8 group-local indices",
         sum(_tc(o, i, p, words=576, col_bytes=1) for _, o, i, _ in LAYER) + perms + header),
        ("  ... and k-steps padded to 1, not 2",
         sum(_tc(o, i, p, words=576, col_bytes=1, step_multiple=1) for _, o, i, _ in LAYER) + perms + header),
        ("  ... and int32 permutations, no stored inverse",
         sum(_tc(o, i, p, words=576, col_bytes=1, step_multiple=1) for _, o, i, _ in LAYER) + _perms(4, False)
         + header),
    ]  # fmt: skip
    assert weights["tc"] == sum(_tc(o, i, p) for _, o, i, _ in LAYER)  # the formula is the module's shapes
    assert weights["tc-compact"] == sum(_tc(o, i, p, words=576, step_multiple=1) for _, o, i, _ in LAYER)
    return rows


def table(rows: dict[str, list[tuple[str, int]]]) -> str:
    """The markdown tables of ``rows`` (pattern -> layer_rows)."""
    lines = [f"Dense fp16 weights of one Llama-2-7B decoder layer (7 linears): {DENSE} bytes.", ""]
    for name, pattern_rows in rows.items():
        lines += [f"### {name}", "", "| what is stored | bytes per layer | vs dense |", "|---|---|---|"]
        lines += [f"| {what} | {b:,} | {b / DENSE:.4f}x |" for what, b in pattern_rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", nargs="+", default=["64:2:5", "64:2:8"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = {str(p): layer_rows(p) for p in map(VNMPattern.parse, args.patterns)}
    text = table(rows)
    if args.out is None:
        print(text)
        return 0
    env = environment("cpu", program="python ")  # the modules are built on the meta device: no GPU runs
    title = "Bytes of a compressed Llama-2-7B decoder layer per layout (computed, not measured)"
    markdown = f"{markdown_header(title, env)}\n{text}\n"
    result = {"environment": env, "dense_bytes": DENSE, "layer_bytes": {k: dict(v) for k, v in rows.items()}}
    save_results_at(args.out, result, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
