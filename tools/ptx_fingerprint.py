"""Fingerprints of the Triton kernels' PTX, compiled offline (no GPU needed), to show a refactor changes
no generated code: run it before and after the change and diff the two outputs.

    python tools/ptx_fingerprint.py > before.txt
    (edit vnm_compile/kernels/vnm_triton.py)
    python tools/ptx_fingerprint.py > after.txt && diff before.txt after.txt

Each line: kernel kind, its variant (the constexprs that differ between variants), the md5 of the PTX
without its debug information (source line numbers move with any edit) and the PTX length. The target
defaults to sm_90 (H100/H200). Run it with TRITON_INTERPRET unset: under the interpreter Triton does
not compile. For the CUDA C++ kernels (kernels/csrc/vnm_mma_sp.cu) the same check is
tools/cuda_fingerprint.py.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import itertools
import os
import re
import sys

PTR16 = "*fp16"
MATRIX_PTRS = {
    "x_ptr": PTR16, "val_ptr": PTR16, "bias_ptr": PTR16, "y_ptr": PTR16, "col_ptr": "*i64", "meta_ptr": "*i32",
    "ridx_ptr": "*i32", "ws_ptr": "*fp32", "xt_ptr": PTR16, "wc_ptr": PTR16,
}  # fmt: skip
# kind -> (pointer types that differ from MATRIX_PTRS, fixed constexprs, constexprs varied over all values)
VARIANTS = {
    "fma": ({}, dict(CHUNKS_CONST=None, GC=128, BLOCK_R=4, VAL_ALIGN=8, COL_BITS=16),
            dict(EVEN_G=(False, True), HAS_RIDX=(False, True), HAS_BIAS=(False, True))),
    "rows": ({"meta_ptr": "*i16"}, dict(CHUNKS_CONST=None, GC=128, BLOCK_Q=1, R=4, COL_BITS=16),
             dict(EVEN_G=(False, True), HAS_RIDX=(False, True), HAS_BIAS=(False, True))),
    "dot": ({}, dict(CHUNKS_CONST=None, GC=16, BLOCK_R=64, BLOCK_T=128, EVEN_G=True, VAL_ALIGN=8, IN_PREC="tf32",
                     DOT_UPCAST=False),
            dict(EVEN_T=(False, True), SPLIT=(False, True), HAS_RIDX=(False, True), HAS_BIAS=(False, True))),
    "gather": ({"col_ptr": "*i16"}, dict(K_CONST=None, BLOCK_R=64, BLOCK_T=128, BLOCK_K=64, GROUP_R=8,
                                         IN_PREC="tf32", DOT_UPCAST=False),
               dict(EVEN_K=(False, True), HAS_RIDX=(False, True), HAS_BIAS=(False, True))),
}  # fmt: skip


def strip_debug(ptx: str) -> str:
    """The PTX without debug sections, .loc/.file directives and debug labels."""
    body = ptx.split(".section\t.debug")[0]
    return "\n".join(
        line for line in body.splitlines() if not re.match(r"\s*\.(loc|file)\b", line) and not line.startswith("$L__")
    )


def fingerprints(kinds: list[str], arch: int = 90) -> list[str]:
    """One line per kernel variant: kind, varied constexprs, md5 of the stripped PTX, its length."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from vnm_compile.kernels import vnm_triton

    target = GPUTarget("cuda", arch, 32)
    lines = []
    for kind in kinds:
        ptr_types, fixed, varied = VARIANTS[kind]
        fn = vnm_triton._KERNEL_FNS[kind]
        params = list(inspect.signature(fn).parameters)
        for values in itertools.product(*varied.values()):
            consts = {**fixed, **dict(zip(varied, values, strict=True))}
            sig = {p: "constexpr" if p in consts else ptr_types.get(p, MATRIX_PTRS.get(p, "i32")) for p in params}
            src = ASTSource(JITFunction(fn), sig, constexprs={(params.index(k),): v for k, v in consts.items()})
            ptx = strip_debug(triton.compile(src, target=target, options={"num_warps": 4, "num_stages": 3}).asm["ptx"])
            name = " ".join(f"{k}={int(v)}" for k, v in zip(varied, values, strict=True))
            lines.append(f"{kind} {name} {hashlib.md5(ptx.encode()).hexdigest()} {len(ptx)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: sm_90)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run with TRITON_INTERPRET unset: the interpreter does not compile kernels")
    for line in fingerprints(args.kinds, args.arch):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
