"""V:N:M on the sparse tensor cores: CUDA kernels on ``mma.sp`` (and on Hopper ``wgmma.sp``).

Triton has no sparse tensor-core instruction, so ``vnm::linear``'s prefill kernel runs dense tensor cores
over each block's 4 kept columns. For n = 2, the 2:4 structure inside those 4 columns is exactly what
``mma.sp.m16n8k32`` takes, so a CUDA kernel can use the sparse tensor cores directly: csrc/vnm_mma_sp.cu,
compiled at run time with NVRTC through PyTorch's CUDA build (``torch.cuda._utils``, a private API; no
CUDA toolkit needed) and launched through the driver.

    packed = pack_sparse_tc(w)          # once per weight: fragment-ordered values + metadata, indices
    y = sparse_tc_linear(x, packed, bias)

Four kernels (``config["KERNEL"]``). Three GEMMs on x^T (x transposed to feature-major per call, one Triton
launch): "gather" stages each V block's 32 kept rows of x^T per k-step; "dense" stages the 8 groups' 8M
rows of x^T once per CTA, shared by its V blocks, and picks the kept rows through ldmatrix's per-lane row
addresses (needs the packer's ``group_columns``: x^T in that row order); both on mma.sp. "wgmma" (Hopper,
compute capability 9.0) gathers like "gather" and multiplies with the warpgroup-level wgmma.mma_async.sp
(the same records: A fragments from registers; B, the gathered rows, from shared memory). And "decode"
(launch_decode, up to DECODE_MAX_TOKENS tokens) on x as it is: A fragments straight from the records into
registers, B by each lane gathering its kept column for every token and the warp transposing through
shared memory, split over the k-steps, the partial sums of each V block reduced in a thread-block cluster
or by its last CTA (see the kernel's comment).
:func:`default_config` picks decode up to DECODE_MAX_TOKENS tokens, else wgmma on Hopper, else dense for
M <= 8, else gather; without a config, sparse_tc_linear autotunes the GEMM over :func:`gemm_candidates`.

Limits: CUDA, compute capability >= 8.0 (BULK=1, bulk copies on mbarriers: 9.0; wgmma: 9.0), fp16/bf16,
n = 2, V a multiple of 64, fewer than 65536 input features. ``vnm_linear(x, w, sparse_tc=pack_sparse_tc(w),
sparse_tc_min_tokens=T, sparse_tc_decode_tokens=(lo, hi))`` and the backend option ``sparse_tensor_cores``
(default "auto": on where :func:`sparse_tc_available`) run them through ``vnm::linear`` from T tokens and at
lo..hi tokens. benchmarks/bench_sparse_tc.py measures the GEMMs alone
(benchmarks/results/nvidia-h200/sparse_tc.md: on an H200 the wgmma kernel 1.25-1.45x cuBLAS at 64:2:8 and
2.37-2.76x at 64:2:16 on Llama-2-7B prefill shapes, x^T given, 1.04-1.14x and 1.26-1.39x faster than the
best mma.sp GEMM), bench_sparse_tc_decode.py the decode kernel
(sparse_tc_decode_transposed.md: 64:2:8 2.24-2.75x at 1 token, 1.92-2.23x at 16); bench_linear's
sparse-TC column the op (linear.md).

The metadata layout of ``mma.sp`` (which lane and 4-bit field hold which row and group) was measured on an
H200 by :func:`probe_metadata_map` and is :data:`METADATA_MAP` (sparsity selector 0; selector 1 reads the
same fields two lanes further, which the packer uses for the odd m16 tiles); the first launch on a device
probes both again and refuses to run if the GPU disagrees.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..format import VNMWeight, _unpack_meta
from ..masks import block_rows
from ..pattern import VNMPattern

__all__ = [
    "DECODE_MAX_TOKENS",
    "METADATA_MAP",
    "SparseTCWeight",
    "check_wgmma_config",
    "default_config",
    "gemm_candidates",
    "launch_decode",
    "pack_sparse_tc",
    "probe_metadata_map",
    "sparse_tc_available",
    "sparse_tc_linear",
    "unsupported",
    "wgmma_available",
]

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("csrc") / "vnm_mma_sp.cu"

# (lane, 4-bit field) -> (row of the 16-row tile, 4-column group of the 32-wide k-step): lane 4g holds row
# g (fields 0-3) and row g + 8 (fields 4-7) for groups 0-3, lane 4g + 1 the same for groups 4-7.
METADATA_MAP: dict[tuple[int, int], tuple[int, int]] = {
    (4 * g + half, field + 4 * upper): (g + 8 * upper, field + 4 * half)
    for g, half, upper, field in itertools.product(range(8), range(2), range(2), range(4))
}

# Tile configurations (compile-time defines), the best on an H200 (sparse_tc.md): M <= 8, the dense kernel
# (x^T rows shared by 4 V blocks, two k-steps per stage; bulk copies of the records, BULK=1, won by up to
# 8 % at 8192 tokens and lost by up to 14 % at 2048); larger M keeps fewer columns per group, and each
# block gathering its own rows (the gather kernel) reads less.
GATHER_CONFIG = {"KERNEL": "gather", "WR": 1, "WN": 4, "NT": 4, "STAGES": 4, "KSUB": 1, "MINB": 4}
DENSE_CONFIG = {"KERNEL": "dense", "WR": 4, "WN": 1, "NT": 8, "STAGES": 3, "KSUB": 2, "MINB": 2, "BULK": 0}

# The decode kernel (vnm_mma_sp_decode): up to DECODE_MAX_TOKENS tokens, x token-major (no transpose launch), split
# over the k-steps so that about CTAS_PER_SM CTAs of DW warps run per SM; each warp loads DU k-steps'
# operands at a time into registers, DP=1 the next DU while it computes the current ones; XS picks how the B
# fragments are built from x (0: each lane gathers its own from global memory; 1: the k-step's slice of x
# staged in shared memory; 2, absent: each lane gathers its kept column for every token and the warp transposes
# them through shared memory, see launch_decode); CL=1 sums a block's split-K partials inside a thread-block
# cluster (sm_90; at most DECODE_MAX_CLUSTER CTAs per block; elsewhere it runs as CL=0) instead of through
# global memory. DECODE_GRID, what the autotuning times, was picked greedily from an H200 sweep of 35 configs
# (the earlier XS=0/1 grid, its XS=2 copies and six more XS=2 configs; sparse_tc_decode_xs_explore.md) at the
# Llama-2-7B shapes, 1, 4, 16 and 32 tokens, 64:2:5 and 64:2:8, plus configs without clusters; DECODE_CONFIGS,
# the configs without autotuning by token count (up to the key), are the best on average there.
# benchmarks/sweep_sparse_tc_decode_xs.py re-timed the grid with each XS (sparse_tc_decode_xs_sweep.md: XS=2
# the best in all 24 cases, 1.01-1.42x faster than the best XS=0 config, most at 16 and 32 tokens; the grid's
# first 5 configs within 0.03 % of the best on average). That script and both files are at commit 4d7df79.
# The Hopper GEMM (vnm_wgmma_sp_gemm, KERNEL="wgmma", sm_90 only): one warpgroup per 64-row V block, WG blocks
# and TNW tokens per CTA, WST pipeline stages, MINB CTAs per SM; SHARE=1 (V a multiple of 128) lets the two
# 64-row halves of a V block read one copy of its gathered x^T rows. WGMMA_CONFIG is the best on average on
# an H200 at the Llama-2-7B shapes (2048 and 8192 tokens, 64:2:5/8/16; sparse_tc.md), WGMMA_GRID what
# sparse_tc_linear's autotuning times after it (the best per shape there, DeiT-B's included). The gathers of
# x^T rows, at L2 bandwidth, take 77-96 % of the kernel's time (wgmma_variants.md at 4d7df79), so how the multiplies are
# issued hardly matters: wider instructions and pipelined wgmma were level or slower (docs/experiments.md).
WGMMA_CONFIG = {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WST": 4, "MINB": 2}
WGMMA_SHARE_CONFIG = {"KERNEL": "wgmma", "WG": 2, "TNW": 256, "WST": 4, "SHARE": 1}
WGMMA_GRID = [
    {"KERNEL": "wgmma", "WG": 2, "TNW": 256, "WST": 4},
    {"KERNEL": "wgmma", "WG": 1, "TNW": 128, "WST": 4, "MINB": 4},
    {"KERNEL": "wgmma", "WG": 1, "TNW": 128, "WST": 6, "MINB": 3},
    {"KERNEL": "wgmma", "WG": 1, "TNW": 256, "WST": 3, "MINB": 3},
]

DECODE_MAX_TOKENS = 32
DECODE_MAX_CLUSTER = 8  # CTAs per V block with CL=1 (the portable cluster size)


def _decode(dw: int, du: int, ctas_per_sm: int, xs: int, cl: int = 0, dp: int = 0) -> dict:
    cfg = {"KERNEL": "decode", "DW": dw, "DU": du, "CTAS_PER_SM": ctas_per_sm, "XS": xs}
    return {**cfg, **({"CL": 1} if cl else {}), **({"DP": 1} if dp else {})}


DECODE_GRID = [
    _decode(4, 2, 2, 2, cl=1), _decode(8, 2, 1, 2, cl=1, dp=1), _decode(4, 2, 4, 2, cl=1), _decode(8, 1, 2, 2, cl=1),
    _decode(16, 1, 1, 2, cl=1, dp=1), _decode(8, 1, 2, 2, cl=1, dp=1), _decode(4, 1, 4, 2, cl=1, dp=1),
    _decode(8, 1, 4, 2), _decode(8, 1, 1, 2, cl=1), _decode(4, 2, 4, 2), _decode(8, 2, 2, 2), _decode(8, 1, 2, 2, dp=1),
]  # fmt: skip
DECODE_CONFIGS = {
    8: _decode(4, 2, 4, 2, cl=1),
    16: _decode(8, 1, 2, 2, cl=1),
    32: _decode(8, 1, 1, 2, cl=1),
}


def default_config(w: SparseTCWeight, tokens: int | None = None) -> dict:
    """The tile configuration sparse_tc_linear uses for ``w`` (and ``tokens`` rows of x) without autotuning:
    the decode kernel up to DECODE_MAX_TOKENS tokens, else on a Hopper GPU (where ``w`` is) the wgmma GEMM,
    elsewhere the dense or the gather mma.sp GEMM."""
    if tokens is not None and tokens <= DECODE_MAX_TOKENS:
        return default_decode_config(tokens)
    if wgmma_available(w.device):
        return WGMMA_SHARE_CONFIG if w.block_rows % 128 == 0 else WGMMA_CONFIG
    return mma_sp_config(w)


def mma_sp_config(w: SparseTCWeight) -> dict:
    """The mma.sp GEMM for ``w``: the dense kernel where its x^T rows exist and M <= 8, else the gather one."""
    return DENSE_CONFIG if w.group_columns is not None and w.group_width <= 8 else GATHER_CONFIG


def gemm_candidates(w: SparseTCWeight) -> list[dict]:
    """The GEMM configs sparse_tc_linear's autotuning times for ``w`` beyond DECODE_MAX_TOKENS: the default
    first, then (on Hopper) WGMMA_GRID and the mma.sp GEMM."""
    first = default_config(w)
    if first["KERNEL"] != "wgmma":
        return [first]
    grid = [WGMMA_CONFIG, *WGMMA_GRID] if first is not WGMMA_CONFIG else WGMMA_GRID
    return [first, *grid, mma_sp_config(w)]


def wgmma_available(device: torch.device | str | None) -> bool:
    """Whether the wgmma GEMM can run on ``device``: a CUDA device of compute capability 9.0."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return False
    return sparse_tc_available(device) and torch.cuda.get_device_capability(device) == (9, 0)


def default_decode_config(tokens: int) -> dict:
    """The decode kernel's config for this many tokens (1..DECODE_MAX_TOKENS) without autotuning."""
    if not 1 <= tokens <= DECODE_MAX_TOKENS:
        raise ValueError(f"the decode kernel takes 1 to {DECODE_MAX_TOKENS} tokens, got {tokens}")
    return DECODE_CONFIGS[min(t for t in DECODE_CONFIGS if t >= tokens)]


@dataclass(frozen=True)
class SparseTCWeight:
    """A VNMWeight laid out for the mma.sp kernel (pack_sparse_tc)."""

    records: Tensor  # (blocks, steps, 584) int32: per 64-row block and 8-group k-step, A fragments (512),
    # metadata (64: word p of a lane serves m16 tiles 2p and 2p + 1 through mma.sp's sparsity selector), and the
    # k-step's 32 kept columns as rows of the dense kernel's x^T tile (32 uint8); compact packing (576 words):
    # without those rows
    columns: Tensor  # (blocks, steps, 32) int16: the k-step's 32 kept input columns (as unsigned 16-bit)
    row_index: Tensor | None  # output row of each stored row (output permutation), or None
    out_features: int
    in_features: int
    dtype: torch.dtype
    # The dense kernel's x^T row order: (steps * 8 * group_width,) int32 input feature of each row, group by
    # group (-1: a zero row), or None where some group's kept columns span more than group_width features.
    group_columns: Tensor | None = None
    group_width: int = 0
    group_identity: bool = False  # group_columns is arange (past in_features: -1): a plain transpose fills it
    block_rows: int = 64  # V of the pattern (records are per 64 rows; a V block spans V / 64 of them)

    @property
    def device(self) -> torch.device:
        return self.records.device

    @property
    def record_bytes(self) -> int:
        """Bytes of one record: REC_BYTES, or COMPACT_RECORD * 4 for a compact packing."""
        return self.records.shape[-1] * 4

    def rec_define(self) -> dict:
        """The kernels' compile-time REC for these records (none for the default ones: the same modules)."""
        return {} if self.record_bytes == REC_BYTES else {"REC": self.record_bytes}

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the VNMWeight it was packed from (whose row_index it shares)."""
        return sum(
            t.numel() * t.element_size() for t in (self.records, self.columns, self.group_columns) if t is not None
        )


def sparse_tc_available(device: torch.device | str | None = None) -> bool:
    """Whether sparse_tc_linear can run here: a CUDA device of compute capability >= 8.0 and PyTorch's
    NVRTC helpers."""
    if not torch.cuda.is_available():
        return False
    try:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def unsupported(pattern: VNMPattern, dtype: torch.dtype, in_features: int) -> str | None:
    """Why the mma.sp kernels cannot take a weight of this pattern, dtype and width, or None when they can."""
    if pattern.n != 2 or block_rows(pattern) % 64:
        return f"the mma.sp kernel needs n = 2 and V a multiple of 64, got {pattern}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the mma.sp kernel takes float16 or bfloat16 weights, got {dtype}"
    if in_features >= 1 << 16:
        return f"the mma.sp kernel needs fewer than 65536 input features, got {in_features}"
    return None


def pack_sparse_tc(w: VNMWeight, metadata_map: dict | None = None, *, compact: bool = False) -> SparseTCWeight:
    """Lay ``w`` out for the mma.sp kernels (same bytes as its values + metadata, plus 3 bytes per kept
    column). Per 64-row block and k-step of 8 groups: the 4 m16 tiles' A fragments (compressed 16x16,
    dense m16n8k16 register layout, lane-major), their metadata (tiles 2p and 2p + 1 share word p of each
    lane: sparsity selector 0 reads lanes 4g and 4g + 1, selector 1 lanes 4g + 2 and 4g + 3, so no lane
    loads a word the instruction ignores), and the 32 kept columns' rows in the dense kernel's x^T tile;
    separately the 32 kept input columns (the gather kernel's indices) and the dense kernel's x^T row
    order. The number of k-steps is padded to even with zero groups.

    ``compact=True``: records of COMPACT_RECORD words, without the local rows, and the k-steps padded to
    whole steps only (1.3-2 % fewer bytes at 64:2:5): the gather, wgmma and decode kernels run it (compiled
    with REC=COMPACT_RECORD * 4), the dense mma.sp GEMM does not (no x^T row order)."""
    if not isinstance(w, VNMWeight):
        raise TypeError(f"pack_sparse_tc takes a VNMWeight, got {type(w).__name__}")
    why = unsupported(w.pattern, w.dtype, w.in_features)
    if why is not None:
        raise ValueError(why)
    meta_map = METADATA_MAP if metadata_map is None else metadata_map
    if any(lane % 4 >= 2 for lane, _ in meta_map):
        raise ValueError("pack_sparse_tc: the metadata map must use lanes 4g and 4g + 1 (sparsity selector 0): "
                         "the other two lanes of each quad carry the odd m16 tiles (selector 1)")  # fmt: skip
    rows_p, groups = w.values.shape[0], w.columns.shape[1]
    blocks, steps = rows_p // 64, (-(-groups // 8) if compact else -(-groups // 16) * 2)
    gp = steps * 8
    vals = w.values.view(rows_p, groups, 2)
    pos = _unpack_meta(w.meta, 2, groups)
    order = pos.argsort(-1)  # mma.sp::ordered_metadata: the two positions ascending
    pos, vals = pos.gather(-1, order), vals.gather(-1, order)
    cols = w.columns.long().repeat_interleave(w.block_rows // 64, 0)
    if gp != groups:  # zero groups reading column 0
        vals = torch.cat([vals, vals.new_zeros(rows_p, gp - groups, 2)], 1)
        pos = torch.cat([pos, torch.tensor([0, 1], device=pos.device).expand(rows_p, gp - groups, 2)], 1)
        cols = torch.cat([cols, cols.new_zeros(blocks, gp - groups, 4)], 1)
    # A: row = mt*16 + h*8 + g, group = step*8 + gh*4 + q -> lane (g, q), register (gh, h), two halves
    a = vals.reshape(blocks, 4, 2, 8, steps, 2, 4, 2).permute(0, 4, 1, 3, 6, 5, 2, 7).contiguous()
    afrag = a.view(torch.int32).reshape(blocks, steps, 512)
    code = (pos[..., 0] | (pos[..., 1] << 2)).reshape(blocks, 4, 16, steps, 8)  # (block, mt, row, step, group)
    # tiles 2p and 2p + 1 share word p: tile 2p in the map's lanes (4g, 4g + 1: sparsity selector 0), tile
    # 2p + 1 in the other two (selector 1)
    e = torch.zeros(blocks, steps, 2, 32, dtype=torch.int64, device=pos.device)
    for mt in range(4):
        for (lane, field), (r, c) in (selector1_map(meta_map) if mt % 2 else meta_map).items():
            e[:, :, mt // 2, lane] |= code[:, mt, r, :, c] << (4 * field)
    efrag = torch.where(e >= 2**31, e - 2**32, e).to(torch.int32).reshape(blocks, steps, 64)
    idx = cols.reshape(blocks, steps, 32)
    idx = torch.where(idx >= 1 << 15, idx - (1 << 16), idx).to(torch.int16)
    if compact:
        return SparseTCWeight(torch.cat([afrag, efrag], -1).contiguous(), idx.contiguous(), w.row_index,
                              w.out_features, w.in_features, w.dtype, block_rows=w.block_rows)  # fmt: skip
    group_columns, local, identity = _group_rows(cols, w.pattern.m, w.in_features)
    if local is None:
        local = torch.zeros(blocks, gp, 4, dtype=torch.int64, device=cols.device)
    lrows = (local + w.pattern.m * (torch.arange(gp, device=cols.device) % 8).view(1, gp, 1)).to(torch.uint8)
    lrows = lrows.reshape(blocks, steps, 32).view(torch.int32)
    return SparseTCWeight(
        torch.cat([afrag, efrag, lrows], -1).contiguous(), idx.contiguous(), w.row_index, w.out_features,
        w.in_features, w.dtype, group_columns, w.pattern.m if group_columns is not None else 0, identity,
        block_rows=w.block_rows,
    )  # fmt: skip


def _group_rows(cols: Tensor, m: int, in_features: int) -> tuple[Tensor | None, Tensor | None, bool]:
    """For the dense kernel: the input features each group's blocks keep, at most m per group, as x^T rows
    ((groups * m,) int32, -1 for unused rows), the row within its group of every kept column ((blocks,
    groups, 4)), and whether the rows are simply features 0, 1, ... (no input permutation: group g keeps
    features among g * m .. g * m + m - 1). (None, None, False) when a group's blocks keep more than m
    distinct features (a VNMWeight not built by from_dense)."""
    blocks, groups, _ = cols.shape
    if 8 * m > 256:  # the records hold each row as one byte
        return None, None, False
    local = cols - (torch.arange(groups, device=cols.device) * m).view(1, groups, 1)
    inside = (local >= 0) & (local < m)
    if bool((inside | (cols == 0)).all()):  # column 0 outside its group: a padding column (zero weights)
        table = torch.arange(groups * m, dtype=torch.int32, device=cols.device)
        return table.masked_fill(table >= in_features, -1), torch.where(inside, local, 0), True
    flat = cols.permute(1, 0, 2).reshape(groups, blocks * 4)
    ordered = flat.sort(1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = first.long().cumsum(1) - 1  # slot of each sorted entry: distinct features in ascending order
    if groups and int(rank[:, -1].max()) >= m:
        return None, None, False
    table = torch.full((groups, m), -1, dtype=torch.int64, device=cols.device)
    table.scatter_(1, rank, ordered)  # entries of one rank hold one feature: no write conflicts
    slot = rank.gather(1, torch.searchsorted(ordered, flat))  # leftmost match: the first occurrence
    return table.flatten().to(torch.int32), slot.view(groups, blocks, 4).permute(1, 0, 2), False


# --------------------------------------------------------------------------- compilation and launch
class _Kernels:
    """NVRTC-compiled entry points of vnm_mma_sp.cu, one module per (device, compile-time defines)."""

    def __init__(self, source: str | None = None) -> None:
        self._src = SOURCE.read_text() if source is None else source  # another source: benchmarks' probes
        self._cache: dict = {}
        self.checked: set[int] = set()

    def get(self, name: str, arch: str | None = None, **defines):
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

        key = (torch.cuda.current_device(), name, arch, tuple(sorted(defines.items())))
        if key not in self._cache:
            code, mangled = _nvrtc_compile(self._src, name, arch, None, [f"-D{k}={v}" for k, v in defines.items()])
            kernel = _cuda_load_module(code, [mangled])[mangled]
            if name.startswith(("vnm_mma_sp_", "vnm_wgmma_sp_")):  # dynamic shared memory beyond 48 KiB
                props = torch.cuda.get_device_properties(torch.cuda.current_device())
                kernel.set_shared_memory_config(getattr(props, "shared_memory_per_block_optin", 48 << 10))
            self._cache[key] = kernel
        return self._cache[key]


_KERNELS: _Kernels | None = None


def _kernels() -> _Kernels:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _Kernels()
    return _KERNELS


def selector1_map(meta_map: dict[tuple[int, int], tuple[int, int]]) -> dict[tuple[int, int], tuple[int, int]]:
    """The metadata layout under sparsity selector 1, as the packer writes it for the odd m16 tiles: the
    fields of ``meta_map`` (selector 0, lanes 4g and 4g + 1) two lanes further."""
    return {(lane + 2, field): rc for (lane, field), rc in meta_map.items()}


def probe_metadata_map(
    device: torch.device | str | None = None, selector: int = 0
) -> dict[tuple[int, int], tuple[int, int]]:
    """Measure the mma.sp.m16n8k32 f16 metadata layout on this GPU under sparsity selector ``selector``:
    every 4-bit field of every lane is flipped from positions (0, 1) to (2, 3), and the output rows that move
    say which row and group it encodes. Also checks the A (compressed 16x16 in the dense m16n8k16 layout), B
    and C layouts the packer assumes. Raises RuntimeError when the GPU disagrees."""
    if selector not in (0, 1):
        raise ValueError(f"the sparsity selector of m16n8k32 is 0 or 1, got {selector}")
    dev = torch.device("cuda", torch.cuda.current_device() if device is None else torch.device(device).index)
    with torch.cuda.device(dev):
        k = _kernels().get("probe_mma_sp")
        gen = torch.Generator().manual_seed(0)
        vals = torch.randn(16, 8, 2, generator=gen).half()  # compressed A: row, group, slot
        bmat = torch.randn(32, 8, generator=gen).half()  # logical K x N
        a = torch.empty(32, 4, 2, dtype=torch.half)
        b = torch.empty(32, 4, 2, dtype=torch.half)
        for lane in range(32):
            g, q = divmod(lane, 4)
            a[lane] = torch.stack([vals[g, q], vals[g + 8, q], vals[g, q + 4], vals[g + 8, q + 4]])
            for r in range(4):
                b[lane, r] = bmat[2 * q + 8 * r : 2 * q + 8 * r + 2, g]
        a_u, b_u = a.view(torch.int32).view(32, 4).to(dev), b.view(torch.int32).view(32, 4).to(dev)

        def run(words: list[int]) -> Tensor:
            meta = torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in words], dtype=torch.int32, device=dev)
            d = torch.full((32, 4), float("nan"), device=dev)
            k((1, 1, 1), (32, 1, 1), [a_u, b_u, meta, d, selector])
            d = d.cpu()
            out = torch.empty(16, 8)
            for lane in range(32):
                g, q = divmod(lane, 4)
                out[g, 2 * q : 2 * q + 2], out[g + 8, 2 * q : 2 * q + 2] = d[lane, :2], d[lane, 2:]
            return out

        def dense_a(moved: tuple[int, int] | None) -> Tensor:
            full = torch.zeros(16, 32)
            for r, c in itertools.product(range(16), range(8)):
                base = 4 * c + (2 if (r, c) == moved else 0)
                full[r, base : base + 2] = vals[r, c].float()
            return full

        ref0 = dense_a(None) @ bmat.float()
        d0 = run([0x44444444] * 32)
        err = (d0 - ref0).abs().max().item()
        if not err < 1e-2:
            raise RuntimeError(f"mma.sp probe: A/B/C fragment layouts differ from the packer's (max error {err})")
        found: dict[tuple[int, int], tuple[int, int]] = {}
        for lane, field in itertools.product(range(32), range(8)):
            words = [0x44444444] * 32
            words[lane] = (words[lane] & ~(0xF << (4 * field))) | (0xE << (4 * field))
            delta = run(words) - d0
            if delta.abs().max() < 1e-3:
                continue
            hits = [
                (r, c)
                for r in (delta.abs().amax(1) > 1e-3).nonzero().flatten().tolist()
                for c in range(8)
                if ((dense_a((r, c)) @ bmat.float() - ref0)[r] - delta[r]).abs().max() < 1e-2
            ]
            if len(hits) != 1:
                raise RuntimeError(f"mma.sp probe: lane {lane} field {field} is ambiguous: {hits}")
            found[(lane, field)] = hits[0]
        if sorted(found.values()) != [(r, c) for r in range(16) for c in range(8)]:
            raise RuntimeError(f"mma.sp probe: metadata map incomplete ({len(found)} of 128 fields)")
    return found


def _check_device(device: torch.device) -> None:
    kernels = _kernels()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in kernels.checked:
        found = probe_metadata_map(device)
        odd = probe_metadata_map(device, selector=1)  # the odd m16 tiles' metadata
        if found != METADATA_MAP or odd != selector1_map(METADATA_MAP):
            raise RuntimeError(
                f"mma.sp on {torch.cuda.get_device_name(device)} uses another metadata layout than the packer's; "
                "sparse_tc_linear refuses to run (pack_sparse_tc(w, probe_metadata_map()) would match it, if "
                "selector 1 reads the same fields 2 lanes further)"
            )
        kernels.checked.add(index)


REC_BYTES = 2336  # one record: A fragments 2048, metadata 256, local rows 32 (records.shape[-1] * 4)
RECORD, COMPACT_RECORD = 584, 576  # int32 words of a record, with and without the local rows
KERNELS = {"gather": "vnm_mma_sp_gemm", "dense": "vnm_mma_sp_dense", "wgmma": "vnm_wgmma_sp_gemm"}

_COUNTERS: dict[tuple[int, int], Tensor] = {}  # (device, stream) -> the decode kernel's arrival counters


def decode_split(blocks: int, steps: int, sms: int, ctas_per_sm: int, max_split: int | None = None) -> tuple[int, int]:
    """(k-steps per CTA, CTAs per V block) for the decode kernel: about ``ctas_per_sm * sms`` CTAs in all,
    at most ``max_split`` per block."""
    if min(blocks, steps, sms, ctas_per_sm, 1 if max_split is None else max_split) < 1:
        raise ValueError(
            f"decode_split needs positive sizes, got {blocks=} {steps=} {sms=} {ctas_per_sm=} {max_split=}"
        )
    split = max(1, min(steps, max_split or steps, round(ctas_per_sm * sms / blocks)))
    per = -(-steps // split)
    return per, -(-steps // per)


def _counters(device: torch.device, blocks: int) -> Tensor:
    """Zeroed int32 arrival counters for the decode kernel's split-K, one per V block; the last CTA of a
    block resets its counter, so one buffer per (device, stream) serves every launch on that stream."""
    key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < blocks:
        buf = torch.zeros(max(blocks, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


class _LaunchConfig(ctypes.Structure):  # the driver's CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint),
    ]  # fmt: skip


def max_active_clusters(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int) -> int:
    """How many clusters of ``kernel`` (its compile-time cluster shape) the GPU can hold at once
    (``cuOccupancyMaxActiveClusters``); 0 where a launch would fail: too much shared memory for a cluster
    of that size, a MIG slice or another part without enough SMs per GPC. The driver's error, if any, is
    logged and counts as 0."""
    lib = ctypes.CDLL("libcuda.so.1")
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem, None, None, 0)
    count = ctypes.c_int(0)
    func = kernel.func if isinstance(kernel.func, ctypes.c_void_p) else ctypes.c_void_p(kernel.func)
    err = lib.cuOccupancyMaxActiveClusters(ctypes.byref(count), func, ctypes.byref(cfg))
    if err:
        log.warning("cuOccupancyMaxActiveClusters failed (CUresult %d) for cluster grid %s", err, grid)
        return 0
    return count.value


# (compiled kernel: device, defines and so cluster and block shape; shared memory) -> whether its clusters fit
_CLUSTERS_FIT: dict[tuple, bool] = {}


def _clusters_fit(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], smem: int) -> bool:
    key = (kernel, smem)  # compiled kernels live as long as the process (_Kernels' cache)
    if key not in _CLUSTERS_FIT:
        _CLUSTERS_FIT[key] = max_active_clusters(kernel, grid, block, smem) > 0
        if not _CLUSTERS_FIT[key]:
            log.warning("decode kernel: clusters of %d CTAs with %d bytes of shared memory do not fit this GPU "
                        "(%s); summing the split-K partials through global memory (CL=0) instead", grid[1], smem,
                        torch.cuda.get_device_name())  # fmt: skip
    return _CLUSTERS_FIT[key]


def decode_smem(config: dict, tokens: int, kcols: int) -> int:
    """Shared memory of one decode CTA: a flag, then every warp's sums or (before them) its DU x slices (XS=1)
    or DU x NT x^T tiles of 32 rows x 8 tokens (XS=2)."""
    nt = -(-tokens // 8)
    xs = config.get("XS", 0)
    staged = config["DW"] * config["DU"] * (8 * nt * (kcols + 8) * 2 if xs == 1 else nt * 512 if xs == 2 else 0)
    sums = config["DW"] * 8 * nt * 68 * 4 + (8 * nt * 64 * 4 if config.get("CL") else 0)
    return 16 + max(sums, staged)


def _can_stage(x2: Tensor, w: SparseTCWeight) -> bool:
    """Whether the decode kernel can stage x's k-step slices (XS=1): groups keep columns of their own span
    and x's rows are 16-byte aligned."""
    return w.group_identity and x2.stride(0) % 8 == 0 and x2.data_ptr() % 16 == 0


def launch_decode(x2: Tensor, w: SparseTCWeight, y: Tensor, bias: Tensor | None, config: dict) -> None:
    """The decode kernel on token-major ``x2`` (tokens <= DECODE_MAX_TOKENS, rows contiguous) -> y.
    ``config["XS"]``: 1 stages each k-step's slice of x in shared memory (needs a weight whose groups keep
    columns of their own span, ``w.group_identity``, and x rows 16-byte aligned), 0 gathers each lane's B
    fragment from global memory, 2 has each lane gather its kept column for all tokens (one token row per
    load) and transposes through shared memory (any weight; absent: 2).
    ``config["DP"]``: 1 loads each warp's next DU k-steps while it computes the current ones (XS=0 or 2).
    ``config["CL"]``: 1 sums the split-K partials in a thread-block cluster (on GPUs without clusters, before
    sm_90, or where the driver says such a cluster does not fit, through global memory as with 0; the same
    result either way)."""
    tokens = x2.shape[0]
    if not 1 <= tokens <= DECODE_MAX_TOKENS:
        raise ValueError(f"the decode kernel takes 1 to {DECODE_MAX_TOKENS} tokens, got {tokens}")
    if x2.dim() != 2 or x2.shape[1] != w.in_features or x2.stride(1) != 1:
        raise ValueError(f"x for the decode kernel must be (tokens, {w.in_features}) with contiguous rows, "
                         f"got {tuple(x2.shape)} with strides {x2.stride()}")  # fmt: skip
    xs = config.get("XS", 2)
    if xs not in (0, 1, 2):
        raise ValueError(f"decode config {config}: XS must be 0, 1 or 2")
    if xs == 1 and not _can_stage(x2, w):
        raise ValueError("XS=1 needs a weight without input permutation (w.group_identity) and x rows 16-byte "
                         "aligned")  # fmt: skip
    if config.get("DP") and xs == 1:
        raise ValueError(f"decode config {config}: DP=1 (loading the next k-steps ahead) needs XS=0 or 2")
    nt = -(-tokens // 8)
    props = torch.cuda.get_device_properties(y.device)
    cluster = bool(config.get("CL")) and props.major >= 9  # thread-block clusters: sm_90 and later
    cfg = {"DW": config.get("DW", 4), "DU": config.get("DU", 2), "XS": xs, "CL": int(cluster),
           "DP": int(bool(config.get("DP")))}  # fmt: skip
    kcols = 8 * w.group_width if xs == 1 else 0
    blocks, steps = w.records.shape[:2]
    per, split = decode_split(blocks, steps, props.multi_processor_count, config.get("CTAS_PER_SM", 4),
                              DECODE_MAX_CLUSTER if cfg["CL"] else None)  # fmt: skip
    smem = decode_smem(cfg, tokens, kcols)
    limit = getattr(props, "shared_memory_per_block_optin", 48 << 10)
    if smem > limit:
        raise ValueError(f"decode config {config} needs {smem} bytes of shared memory at {tokens} tokens "
                         f"(the device allows {limit}): use fewer warps (DW), steps in flight (DU), more "
                         "CTAS_PER_SM or XS=0")  # fmt: skip
    bf16 = int(w.dtype == torch.bfloat16)
    if cfg["CL"]:
        cfg["DS"] = split
    k = _kernels().get("vnm_mma_sp_decode", DECODE=1, NT=nt, BF16=bf16, **cfg, **w.rec_define())
    if cfg["CL"] and not _clusters_fit(k, (blocks, split, 1), (cfg["DW"] * 32, 1, 1), smem):
        cfg["CL"] = 0
        del cfg["DS"]
        smem = decode_smem(cfg, tokens, kcols)
        k = _kernels().get("vnm_mma_sp_decode", DECODE=1, NT=nt, BF16=bf16, **cfg, **w.rec_define())
    global_sum = split > 1 and not cfg["CL"]
    work = torch.empty(blocks * split * 64 * 8 * nt if global_sum else 1, dtype=torch.float32, device=y.device)
    counters = _counters(y.device, blocks) if global_sum else work
    k(
        (blocks, split, 1), (cfg["DW"] * 32, 1, 1),
        [x2, x2.stride(0), tokens, w.in_features, kcols, w.records, w.columns, blocks, steps, per, work, counters,
         y, y.stride(0), w.out_features, y if bias is None else bias, int(bias is not None),
         w.records if w.row_index is None else w.row_index, int(w.row_index is not None)],
        shared_mem=smem,
    )  # fmt: skip


def _smem_bytes(cfg: dict, steps: int, group_width: int, rec_bytes: int = REC_BYTES) -> int:
    """Shared memory of one CTA: the pipeline (+ the gather kernel's index table), or the epilogue's
    staging tile if larger."""
    if cfg.get("KERNEL") == "wgmma":  # B tiles and records per stage, the index table, 1024-byte alignment
        pipeline = cfg["WST"] * cfg["WG"] * (64 * cfg["TNW"] + rec_bytes) + cfg["WG"] * steps * 64
        return max(pipeline, cfg["WG"] * cfg["TNW"] * 144) + 1024
    tn = 8 * cfg["NT"] * cfg["WN"]
    records = cfg["WR"] * cfg["KSUB"] * rec_bytes
    epilogue = cfg["WR"] * cfg["WN"] * 8 * cfg["NT"] * 144
    if cfg.get("KERNEL", "gather") == "dense":  # + the stages' mbarriers (used with BULK)
        return max(cfg["STAGES"] * (cfg["KSUB"] * 8 * group_width * tn * 2 + records), epilogue) + 8 * cfg["STAGES"]
    return max(cfg["STAGES"] * (cfg["WR"] * cfg["KSUB"] * 32 * tn * 2 + records) + cfg["WR"] * steps * 64, epilogue)


def _shared_memory(config: dict, steps: int, w: SparseTCWeight, device: torch.device, advice: str) -> int:
    """The GEMM config's shared memory for ``w`` (_smem_bytes), or a ValueError where the device has less."""
    smem = _smem_bytes(config, steps, w.group_width, w.record_bytes)
    limit = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 48 << 10)
    if smem > limit:
        raise ValueError(
            f"config {config} needs {smem} bytes of shared memory for {w.in_features} input features "
            f"(the device allows {limit}): use {advice}"
        )
    return smem


def launch(xt: Tensor, tokens: int, w: SparseTCWeight, y: Tensor, bias: Tensor | None, config: dict) -> None:
    """One kernel launch: x^T (feature_major(x, w, config): zero past ``tokens``, row stride a multiple of 8)
    -> y (tokens, out_features). ``config["KERNEL"]`` picks the kernel ("gather", the default, or "dense").
    Checks only that x^T has the row layout of that kernel; the rest is sparse_tc_linear's job."""
    kind = config.get("KERNEL", "gather")
    if kind not in KERNELS:
        raise ValueError(f"unknown sparse_tc kernel {kind!r}: use one of {sorted(KERNELS)}")
    if kind == "wgmma":
        _launch_wgmma(xt, tokens, w, y, bias, config)
        return
    dense = kind == "dense"
    if dense and w.group_columns is None:
        raise ValueError("this weight has no dense x^T row order (a group keeps more than M features): "
                         "use the gather kernel")  # fmt: skip
    rows = w.group_columns.numel() if dense else w.in_features
    if xt.dim() != 2 or xt.shape[0] != rows or xt.shape[1] < tokens or xt.stride(1) != 1 or xt.stride(0) % 8:
        raise ValueError(
            f"x^T for the {kind} kernel must be ({rows}, >= {tokens} tokens) with rows 16-byte aligned "
            f"(feature_major(x, w, config) builds it), got {tuple(xt.shape)} with strides {xt.stride()}"
        )
    cfg = {k: v for k, v in config.items() if k != "KERNEL"}
    cfg["BF16"] = int(w.dtype == torch.bfloat16)
    if dense:
        cfg.update(GM=w.group_width, BULK=cfg.get("BULK", 0))
        if cfg["BULK"] and torch.cuda.get_device_capability(y.device) < (9, 0):
            raise ValueError("BULK=1 (bulk copies on mbarriers) needs compute capability >= 9.0")
    k = _kernels().get(KERNELS[kind], **cfg, **w.rec_define())
    blocks, steps = w.records.shape[:2]
    if steps % cfg["KSUB"]:
        raise ValueError(f"KSUB={cfg['KSUB']} does not divide the weight's {steps} k-steps")
    smem = _shared_memory(config, steps, w, y.device, "fewer V blocks per CTA (WR), tokens per CTA or stages")
    tn = 8 * cfg["NT"] * cfg["WN"]
    head = [xt, xt.stride(0), tokens, w.records] + ([] if dense else [w.columns])
    k(
        (-(-blocks // cfg["WR"]), -(-tokens // tn), 1), (cfg["WR"] * cfg["WN"] * 32, 1, 1),
        head + [blocks, steps, y, y.stride(0), w.out_features, y if bias is None else bias, int(bias is not None),
                w.records if w.row_index is None else w.row_index, int(w.row_index is not None)],
        shared_mem=smem,
    )  # fmt: skip


WGMMA_KEYS = ("WG", "TNW", "WST", "MINB", "SHARE")  # besides KERNEL


def check_wgmma_config(config: dict, w: SparseTCWeight) -> dict:
    """The wgmma kernel's compile-time defines for ``config`` (its keys less KERNEL), or a ValueError naming
    what does not fit: TNW (tokens per CTA) 64/128/256, WG (V blocks per CTA) 1/2/4, WST (stages) >= 3, the
    threads splitting a B tile evenly, SHARE=1 only on 128-row V blocks."""
    cfg = {k: v for k, v in config.items() if k != "KERNEL"}
    unknown = sorted(set(cfg) - set(WGMMA_KEYS))
    if unknown:
        raise ValueError(f"wgmma config: unknown keys {unknown} (it takes {', '.join(WGMMA_KEYS)}): got {config}")
    if cfg.get("TNW", 0) not in (64, 128, 256) or cfg.get("WG", 0) not in (1, 2, 4) or cfg.get("WST", 0) < 3:
        raise ValueError(f"wgmma config needs TNW in (64, 128, 256), WG in (1, 2, 4), WST >= 3: got {config}")
    if (4 * cfg["TNW"]) % (128 * cfg["WG"]):
        raise ValueError(
            f"wgmma config: the {128 * cfg['WG']} threads must split the {4 * cfg['TNW']} 16-byte "
            f"chunks of a B tile evenly (more tokens, TNW, or fewer warpgroups, WG): got {config}"
        )
    if cfg.get("SHARE") and (cfg["WG"] == 1 or w.block_rows % 128):
        raise ValueError(f"SHARE=1 pairs the 64-row halves of 128-row V blocks: needs WG >= 2 and V a multiple "
                         f"of 128, got WG={cfg['WG']} and V={w.block_rows}")  # fmt: skip
    return cfg


def _launch_wgmma(xt: Tensor, tokens: int, w: SparseTCWeight, y: Tensor, bias: Tensor | None, config: dict) -> None:
    """launch() for the Hopper kernel (config keys: check_wgmma_config; compute capability 9.0)."""
    if not wgmma_available(y.device):
        raise ValueError("the wgmma kernel runs on compute capability 9.0 (Hopper) only")
    if xt.dim() != 2 or xt.shape[0] != w.in_features or xt.shape[1] < tokens or xt.stride(1) != 1 or xt.stride(0) % 8:
        raise ValueError(
            f"x^T for the wgmma kernel must be ({w.in_features}, >= {tokens} tokens) with rows 16-byte aligned "
            f"(feature_major(x) builds it), got {tuple(xt.shape)} with strides {xt.stride()}"
        )
    cfg = check_wgmma_config(config, w)
    k = _kernels().get(KERNELS["wgmma"], "90a", WGMMA=1, BF16=int(w.dtype == torch.bfloat16), **cfg, **w.rec_define())
    blocks, steps = w.records.shape[:2]
    smem = _shared_memory(config, steps, w, y.device, "fewer stages (WST), tokens (TNW) or blocks (WG)")
    k(
        (-(-blocks // cfg["WG"]), -(-tokens // cfg["TNW"]), 1), (cfg["WG"] * 128, 1, 1),
        [xt, xt.stride(0), tokens, w.records, w.columns, blocks, steps, y, y.stride(0), w.out_features,
         y if bias is None else bias, int(bias is not None), w.records if w.row_index is None else w.row_index,
         int(w.row_index is not None)],
        shared_mem=smem,
    )  # fmt: skip


def feature_major(x2: Tensor, w: SparseTCWeight | None = None, config: dict | None = None) -> Tensor:
    """x (tokens, features) -> the kernel's activation layout: x^T (features, tokens rounded up to 8),
    zeros past the last token (one Triton launch). For the dense kernel (``config["KERNEL"] == "dense"``)
    the rows follow ``w.group_columns`` (a plain transpose, zero rows appended, where that is the identity)."""
    from .vnm_triton import _feature_major

    padded = -(-x2.shape[0] // 8) * 8
    if w is None or (config or {}).get("KERNEL") != "dense":
        return _feature_major(x2, padded, False)
    if w.group_identity:
        return _feature_major(x2, padded, False, out_rows=w.group_columns.numel())
    return _feature_major(x2, padded, False, w.group_columns)


def sparse_tc_linear(x: Tensor, w: SparseTCWeight, bias: Tensor | None = None, config: dict | None = None) -> Tensor:
    """``F.linear(x, W, bias)`` for any leading dims of x, on the sparse tensor cores (see the module doc)."""
    if not isinstance(w, SparseTCWeight):
        raise TypeError(f"sparse_tc_linear takes a SparseTCWeight (pack_sparse_tc), got {type(w).__name__}")
    if not isinstance(x, Tensor) or x.device.type != "cuda":
        raise ValueError(f"sparse_tc_linear runs on CUDA tensors only, got x on {getattr(x, 'device', type(x))}")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {w.device}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but the packed weight is {w.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight takes {w.in_features}")
    if bias is not None and (bias.shape != (w.out_features,) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be a ({w.out_features},) {x.dtype} tensor on {x.device}")
    if not sparse_tc_available(x.device):
        raise RuntimeError("sparse_tc_linear needs compute capability >= 8.0 and PyTorch's NVRTC helpers")
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    # allocated in x's leading shape and written through a 2-D view: the tensor returned is not a view (a
    # custom op returning a view pays a copy: vnm::compressed_linear clones such outputs)
    result = torch.empty((*x.shape[:-1], w.out_features), device=x.device, dtype=x.dtype)
    y = result.view(tokens, w.out_features)
    if tokens == 0:
        return result
    with torch.cuda.device(x.device):
        _check_device(x.device)
        cfg = config or default_config(w, tokens)
        b = None if bias is None else bias.contiguous()
        if cfg.get("KERNEL") == "decode":
            x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
            if config is None:
                cfg = _tuned_decode(x2, w, y, b)
            launch_decode(x2, w, y, b, cfg)
        else:
            if config is None:
                cfg = _tuned_gemm(x2, w, y, b)
            launch(feature_major(x2, w, cfg), tokens, w, y, b, cfg)
    return result


def decode_candidates(tokens: int) -> list[dict]:
    """The decode configs autotuning times for this many tokens: the default for the count first (what
    runs untuned), then DECODE_GRID."""
    return [default_decode_config(tokens), *DECODE_GRID]


def _tuned_gemm(x2: Tensor, w: SparseTCWeight, y: Tensor, bias: Tensor | None) -> dict:
    """The GEMM config for this weight and token count (gemm_candidates, the transpose of x timed with each),
    chosen and cached like the decode kernel's (see _tuned_decode)."""
    from .vnm_triton import _choose, _token_bucket

    cands = gemm_candidates(w)
    if len(cands) == 1:
        return cands[0]
    key = ("sparse_tc_gemm", y.device.index, w.dtype, w.out_features, w.in_features, w.group_width, w.block_rows,
           _token_bucket(x2.shape[0]))  # fmt: skip
    return _choose(key, cands, lambda cfg: launch(feature_major(x2, w, cfg), x2.shape[0], w, y, bias, cfg))


def _tuned_decode(x2: Tensor, w: SparseTCWeight, y: Tensor, bias: Tensor | None) -> dict:
    """The decode config for this weight and token count: timed once per (device, shape, pattern, layout,
    token bucket) through the Triton path's autotuner (vnm_triton._choose: CUDA-graph replays; inside a
    capture, or with VNM_AUTOTUNE=0, the first candidate), then cached. Configs that cannot run here (XS=1
    on a permuted weight or unaligned x, too much shared memory) are skipped."""
    from .vnm_triton import _choose, _token_bucket

    tokens = x2.shape[0]
    key = ("sparse_tc_decode", y.device.index, w.dtype, w.out_features, w.in_features, w.group_width,
           _can_stage(x2, w), _token_bucket(tokens))  # fmt: skip
    return _choose(key, decode_candidates(tokens), lambda cfg: launch_decode(x2, w, y, bias, cfg))


def unpack_sparse_tc(w: SparseTCWeight, pattern: VNMPattern | str) -> VNMWeight:
    """The exact inverse of :func:`pack_sparse_tc` for a weight packed from ``VNMWeight.from_dense``: the
    row-major VNMWeight (values, columns, meta, row_index) of ``pattern`` back from the records and gather
    indices. Plain PyTorch, on the records' device (the reference of the dense rebuild, and how a compressed
    module leaves the sparse-tensor-core layout: checkpoints, decompress_, CPU)."""
    from ..format import _pack_meta
    from ..pattern import as_pattern

    p = as_pattern(pattern)
    if not isinstance(w, SparseTCWeight):
        raise TypeError(f"unpack_sparse_tc takes a SparseTCWeight, got {type(w).__name__}")
    if block_rows(p) != w.block_rows:
        raise ValueError(f"the packed weight has {w.block_rows}-row blocks, {p} has {block_rows(p)}")
    blocks, steps = w.records.shape[:2]
    rows_p, gp = blocks * 64, steps * 8
    groups = -(-w.in_features // p.m)
    if gp < groups or gp - groups >= (8 if w.records.shape[-1] == COMPACT_RECORD else 16):
        raise ValueError(f"the packed weight has {steps} k-steps, not those of {w.in_features} features at {p}")
    # 1. values: the A fragments back to (row, group, slot); see pack_sparse_tc's permute
    a = w.records[..., :512].contiguous().view(w.dtype).reshape(blocks, steps, 4, 8, 4, 2, 2, 2)
    vals = a.permute(0, 2, 6, 3, 1, 5, 4, 7).reshape(rows_p, gp, 2)
    # 2. positions: each (tile, row, group) 4-bit code from its (lane, field) of the metadata words
    lanes = torch.empty(4, 16, 8, dtype=torch.long)
    fields = torch.empty(4, 16, 8, dtype=torch.long)
    for mt in range(4):
        for (lane, field), (r, c) in (selector1_map(METADATA_MAP) if mt % 2 else METADATA_MAP).items():
            lanes[mt, r, c], fields[mt, r, c] = lane, field
    lanes, fields = lanes.to(w.records.device), fields.to(w.records.device)
    e = w.records[..., 512:576].to(torch.int64).reshape(blocks, steps, 2, 32) & 0xFFFFFFFF
    tile = (torch.arange(4, device=e.device) // 2).view(4, 1, 1).expand(4, 16, 8)
    words = e[:, :, tile, lanes]  # (blocks, steps, 4, 16, 8)
    code = (words >> (4 * fields)) & 0xF
    pos = torch.stack([code & 3, code >> 2], -1)  # (blocks, steps, mt, row, group, slot)
    pos = pos.permute(0, 2, 3, 1, 4, 5).reshape(rows_p, gp, 2)
    # 3. the blocks' kept columns (unsigned 16-bit), one V block per V / 64 records
    cols = (w.columns.to(torch.int64) & 0xFFFF).reshape(blocks, gp, 4)[:: w.block_rows // 64, :groups]
    index_dtype = torch.int16 if w.in_features <= torch.iinfo(torch.int16).max else torch.int32
    values = vals[:, :groups].reshape(rows_p, groups * 2).contiguous()
    meta = _pack_meta(pos[:, :groups], 2)
    return VNMWeight(values, cols.to(index_dtype).contiguous(), meta, w.row_index, p, (w.out_features, w.in_features))
