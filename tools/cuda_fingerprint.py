"""Fingerprints of the CUDA kernels' PTX (kernels/csrc/vnm_mma_sp.cu), compiled offline with NVRTC (no GPU
needed), for the configs the package runs: show that an edit of the .cu changes no generated code.

    pip install nvidia-cuda-nvrtc            # NVRTC without a CUDA toolkit (or use the toolkit's)
    python tools/cuda_fingerprint.py > before.txt
    (edit vnm_compile/kernels/csrc/vnm_mma_sp.cu)
    python tools/cuda_fingerprint.py > after.txt && diff before.txt after.txt

Each line: entry point, target, the compile-time defines (sparse_tc's default, shared and autotuning
configs of each kernel, fp16 and bf16), the sha256 prefix of that entry point's PTX (without comment
lines; the other kernels in the file do not count) and its length. ``--source`` compiles another copy of the file (e.g. ``git show REV:path > old.cu``).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _nvrtc() -> ctypes.CDLL:
    """libnvrtc from the nvidia-cuda-nvrtc wheel (its builtins next to it), else from the system."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    for base in spec.submodule_search_locations if spec else []:
        for lib in sorted(glob.glob(os.path.join(base, "*", "lib", "libnvrtc.so.*"))):
            ctypes.CDLL(sorted(glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so.*")))[0])
            return ctypes.CDLL(lib)
    return ctypes.CDLL("libnvrtc.so")


def ptx(lib: ctypes.CDLL, source: str, name: str, arch: str, defines: dict) -> str:
    """The PTX NVRTC makes for entry point ``name`` with these defines (as sparse_tc compiles it)."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    lib.nvrtcAddNameExpression(prog, name.encode())
    opts = [f"--gpu-architecture=compute_{arch}".encode()] + [f"-D{k}={v}".encode() for k, v in defines.items()]
    if lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts)):
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"{name} {defines}: {log.value.decode()}")
    size = ctypes.c_size_t()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return _entry(buf.value.decode(), name)


def _entry(text: str, name: str) -> str:
    """The PTX of entry point ``name`` alone (the module also holds every other kernel of the file), without
    comment lines, its block labels numbered without the function's index in the module ($L__BB<f>_<n>)."""
    text = re.sub(r"\$L__BB\d+_", "$L__BB_", text)
    lines = [line for line in text.splitlines() if not line.startswith("//")]
    start = next(i for i, line in enumerate(lines) if line.startswith(".visible .entry ") and f" {name}(" in line)
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return "\n".join(lines[start : end + 1])


def cases() -> list[tuple[str, str, dict]]:
    from vnm_compile.kernels import sparse_tc as st

    def defines(cfg: dict) -> dict:
        return {k: v for k, v in cfg.items() if k != "KERNEL"}

    out = []
    for bf16 in (0, 1):
        for cfg in [st.WGMMA_CONFIG, st.WGMMA_SHARE_CONFIG, *st.WGMMA_GRID]:
            out.append((st.KERNELS["wgmma"], "90a", {"WGMMA": 1, "BF16": bf16, **defines(cfg)}))
        for cfg in (st.GATHER_CONFIG, st.DENSE_CONFIG):
            out.append((st.KERNELS[cfg["KERNEL"]], "90a", {"BF16": bf16, **defines(cfg)}))
        for tokens, cfg in st.DECODE_CONFIGS.items():
            out.append(("vnm_mma_sp_decode", "90a", {"DECODE": 1, "NT": -(-tokens // 8), "BF16": bf16, **defines(cfg)}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=ROOT / "vnm_compile" / "kernels" / "csrc" / "vnm_mma_sp.cu")
    args = parser.parse_args(argv)
    lib, source = _nvrtc(), args.source.read_text()
    for name, arch, defs in cases():
        text = ptx(lib, source, name, arch, defs)
        label = " ".join(f"{k}={v}" for k, v in defs.items())
        print(f"{name} sm_{arch} {label} {hashlib.sha256(text.encode()).hexdigest()[:16]} {len(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
