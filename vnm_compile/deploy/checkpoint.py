"""Compressed checkpoints: ``save_compressed(model, path)`` / ``load_compressed(model, path, device=...)``.

A checkpoint is a folder in the transformers layout: safetensors shards ``model-0000i-of-0000N.safetensors``
and ``model.safetensors.index.json`` (``weight_map``: tensor -> shard; ``metadata``: the format, its version,
every compressed layer's pattern, shape, dtype and permutations, tied tensors, non-persistent buffers), and for
a transformers model its ``config.json`` (``architectures``: the saved class). A
compressed layer is stored row-major (``values``, ``columns``, ``meta``: the portable layout; loading lays it
out for the target device), with its permutations, bias and ``vnm_header``; every other tensor as the model
holds it. Nothing dense is stored for a compressed layer, and nothing dense is materialised when loading one:
``load_compressed`` fills a model built on the meta device (or any nn.Module of the same architecture).

Loading reads each tensor with plain file reads into memory of its own and moves it to the target device
at once (``_ShardReader``), so the host holds about one tensor at a time beyond what stays there: reading
through safetensors' memory map would keep every page read resident (and counted against the process)
while its shard is open, a whole checkpoint for a GPU target.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

from ..format import VNMWeight
from ..linears import Conv1DLinear, is_conv1d
from ..pattern import VNMPattern
from .convert import _replace, check_links, compressed_linears, share_storage_
from .linear import FORMAT_VERSION, VNMLinear

__all__ = ["save_compressed", "load_compressed", "INDEX_NAME", "FORMAT_NAME"]

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
FORMAT_NAME = "vnm_compile.compressed"
_LAYER_KEYS = ("values", "columns", "meta", "in_perm", "out_perm", "perm_links", "bias", "vnm_header")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as err:  # pragma: no cover - a declared dependency of the deploy path
        raise ImportError("compressed checkpoints need safetensors: pip install safetensors") from err
    return st


def _layer_tensors(prefix: str, m: VNMLinear) -> dict[str, Tensor]:
    w = m.compressed_weight()
    header = m._header().clone()
    header[6] = 0  # stored row-major whatever the layout in memory
    out = {f"{prefix}values": w.values, f"{prefix}columns": w.columns, f"{prefix}meta": w.meta,
           f"{prefix}vnm_header": header}  # fmt: skip
    for name in ("in_perm", "out_perm", "perm_links", "bias"):
        t = getattr(m, name)
        if t is not None:
            out[prefix + name] = t.detach()
    return out


def _collect(model: nn.Module) -> tuple[dict[str, Tensor], dict]:
    layers = compressed_linears(model)
    tensors: dict[str, Tensor] = {}
    for name, m in layers.items():
        tensors.update(_layer_tensors(f"{name}." if name else "", m))
    skip = tuple(f"{n}." for n in layers)
    for key, t in model.state_dict().items():
        if not key.startswith(skip) and key not in tensors:
            tensors[key] = t
    persistent = set(tensors)
    buffers = []
    for key, t in model.named_buffers():
        if key not in persistent and not key.startswith(skip) and t is not None:
            tensors[key] = t
            buffers.append(key)
    info = {
        name: {"pattern": str(m.pattern), "shape": [m.out_features, m.in_features], "dtype": str(m.weight_dtype),
               "bias": m.bias is not None, "in_perm": m.in_perm is not None, "out_perm": m.out_perm is not None}
        for name, m in layers.items()
    }  # fmt: skip
    return tensors, {"vnm_layers": info, "non_persistent_buffers": buffers}


def save_compressed(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int = 4 << 30) -> Path:
    """Write ``model`` (its compressed linears as compressed tensors, everything else as it is) to the folder
    ``path`` as sharded safetensors with a transformers-style index. Returns the index file's path."""
    st = _safetensors()
    if not compressed_linears(model):
        raise ValueError("save_compressed: the model has no compressed linears (run compress_ first)")
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be > 0, got {max_shard_size}")
    tensors, meta = _collect(model)
    # 1. tied tensors (same storage, shape and strides) are stored once
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"save_compressed: {key} is on the meta device")
        sig = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if sig in first:
            aliases[key] = first[sig]
        else:
            first[sig] = key
    stored = {k: t for k, t in tensors.items() if k not in aliases}
    # 2. shards of at most max_shard_size bytes (a larger single tensor gets its own)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, t in stored.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        st.save_file({k: _owned(t) for k, t in shard.items()}, out / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in stored.values())
    index = {
        "metadata": {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "total_size": total,
                     "aliases": aliases, **meta},
        "weight_map": weight_map,
    }  # fmt: skip
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    _save_config(model, out)
    log.info("saved %d tensors (%.1f MiB) in %d shard(s) to %s", len(stored), total / 2**20, len(shards), out)
    return out / INDEX_NAME


def _save_config(model: nn.Module, out: Path) -> None:
    """A transformers model's config.json (with its class in ``architectures``), so that the folder alone
    rebuilds the model on the meta device (``vnm export onnx --compressed``)."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_json_file", None)):
        return
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    config.to_json_file(out / "config.json")


def _owned(t: Tensor) -> Tensor:
    """A CPU tensor owning its whole storage (safetensors refuses views: compressed siblings share one)."""
    t = t.detach().to("cpu")
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _read_index(path: Path) -> dict:
    index_file = path / INDEX_NAME if path.is_dir() else path
    if not index_file.is_file():
        raise ValueError(f"load_compressed: no {INDEX_NAME} in {path}")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"load_compressed: {index_file} is not valid JSON ({err})") from err
    meta = index.get("metadata", {}) if isinstance(index, dict) else {}
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(f"load_compressed: {index_file} is not a vnm_compile compressed checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_compressed: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"(this vnm_compile reads version {FORMAT_VERSION}; upgrade vnm_compile)"
        )
    return index


# safetensors dtype names -> torch (the ones a checkpoint of this package holds and a few more)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class _ShardReader:
    """Reads tensors of one safetensors file (whose header safetensors has checked) with plain file reads,
    each into a fresh CPU tensor: no page of the file stays mapped, so host memory holds what the caller
    keeps (a tensor moved to a GPU is freed on the host at once)."""

    def __init__(self, file: Path, handle) -> None:
        self.file, self.handle = file, handle
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(size))
        self.base = 8 + size

    def read(self, key: str) -> Tensor:
        entry = self.header[key]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:  # a dtype not mapped here: through safetensors, copied out of its memory map
            return self.handle.get_tensor(key).clone()
        start, end = entry["data_offsets"]
        t = torch.empty(entry["shape"], dtype=dtype)
        if t.numel() * t.element_size() != end - start:
            raise ValueError(f"load_compressed: {key} in {self.file.name} has {end - start} bytes for its shape")
        if t.numel() == 0:
            return t
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.base + start)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ValueError(f"load_compressed: shard {self.file.name} is truncated (reading {key})")
                done += got
        return t


def _open_shards(root: Path, index: dict) -> dict[str, object]:
    """Open every shard (headers only); a missing, truncated or corrupted one raises ValueError."""
    from safetensors import safe_open

    handles = {}
    for name in sorted(set(index["weight_map"].values())):
        file = root / name
        if not file.is_file():
            raise ValueError(f"load_compressed: shard {name} is missing from {root}")
        try:
            handles[name] = safe_open(str(file), framework="pt", device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for a bad file
            raise ValueError(f"load_compressed: shard {name} is truncated or corrupted ({err})") from err
        missing = {k for k, f in index["weight_map"].items() if f == name} - set(handles[name].keys())
        if missing:
            raise ValueError(f"load_compressed: shard {name} lacks {sorted(missing)[:3]} listed in the index")
    return handles


def _plan(model: nn.Module, index: dict, handles: dict) -> tuple[dict, list[str]]:
    """Check the checkpoint against the model before anything changes; returns the layer info and the names
    of the remaining tensors to load."""
    meta, weight_map = index["metadata"], index["weight_map"]
    aliases = meta.get("aliases", {})
    layers = meta["vnm_layers"]

    def shape_of(key: str) -> list[int]:
        key = aliases.get(key, key)
        return list(handles[weight_map[key]].get_slice(key).get_shape())

    modules = dict(model.named_modules())
    for name, info in layers.items():
        m = modules.get(name)
        out_f, in_f = info["shape"]
        if isinstance(m, (nn.Linear, VNMLinear)):
            have = (m.out_features, m.in_features, m.bias is not None)
        elif m is not None and is_conv1d(m):  # a fresh GPT-2-style model: its Conv1D becomes a VNMLinear too
            have = (m.nf, int(m.weight.shape[0]), m.bias is not None)
        else:
            raise ValueError(f"load_compressed: the checkpoint's compressed layer {name!r} is "
                             f"{'missing from' if m is None else type(m).__name__ + ' in'} the model")  # fmt: skip
        if have != (out_f, in_f, info["bias"]):
            raise ValueError(f"load_compressed: {name!r} is {have[0]}x{have[1]} (bias {have[2]}) in the model, "
                             f"{out_f}x{in_f} (bias {info['bias']}) in the checkpoint")  # fmt: skip
    skip = tuple(f"{n}." for n in layers)
    expected = {k: list(t.shape) for k, t in model.state_dict().items() if not k.startswith(skip)}
    saved = [k for k in [*weight_map, *aliases] if not k.startswith(skip)]
    buffers = set(meta.get("non_persistent_buffers", []))
    for key, shape in expected.items():
        if key not in weight_map and key not in aliases:
            raise ValueError(f"load_compressed: the model's {key!r} is not in the checkpoint")
        if shape_of(key) != shape:
            raise ValueError(f"load_compressed: {key!r} is {shape} in the model, {shape_of(key)} in the checkpoint")
    extra = [k for k in saved if k not in expected and k not in buffers]
    if extra:
        raise ValueError(f"load_compressed: the checkpoint's {extra[0]!r} is not in the model")
    return layers, saved


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Tied tensors (stored once, e.g. an LM head tied to its embedding) become one Parameter again:
    ``load_state_dict(assign=True)`` would give each name its own copy."""
    for alias, target in aliases.items():
        owner, _, name = alias.rpartition(".")
        t_owner, _, t_name = target.rpartition(".")
        module, source = model.get_submodule(owner), model.get_submodule(t_owner)
        if name in module._parameters and t_name in source._parameters:
            module._parameters[name] = source._parameters[t_name]
        elif name in module._buffers and t_name in source._buffers:
            module._buffers[name] = source._buffers[t_name]


def load_compressed(
    model: nn.Module, path: str | os.PathLike, device: torch.device | str | None = None, *, layout: str = "auto"
) -> nn.Module:
    """Fill ``model`` **in place** from a ``save_compressed`` folder and return it.

    ``model`` may be built on the meta device (``with torch.device("meta"): ...``); its sparsified linears
    (nn.Linear, transformers Conv1D or VNMLinear) become VNMLinear modules holding only the compressed
    weight, laid out for ``device`` (default: where the model's tensors are, CPU for a meta model); every
    other tensor is loaded as saved. Nothing dense is materialised for a compressed layer. A checkpoint whose layers or
    shapes do not match the model raises ValueError naming the first mismatch, before anything changes.
    ``layout``: as ``compress_``'s ("auto": the sparse-tensor-core packing where it runs, else row-major).
    """
    _safetensors()
    root = Path(path)
    index = _read_index(root)
    root = root if root.is_dir() else root.parent
    handles = _open_shards(root, index)
    layers, rest = _plan(model, index, handles)
    readers = {name: _ShardReader(root / name, h) for name, h in handles.items()}
    if device is None:
        devices = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
        device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    device = torch.device(device)
    weight_map, aliases = index["weight_map"], index["metadata"].get("aliases", {})

    def read(key: str) -> Tensor:
        key = aliases.get(key, key)
        return readers[weight_map[key]].read(key).to(device)

    # 1. the compressed layers, straight to their layout on the device
    modules = dict(model.named_modules())
    for name, info in layers.items():
        prefix = f"{name}." if name else ""
        t = {k: read(prefix + k) if prefix + k in weight_map or prefix + k in aliases else None for k in _LAYER_KEYS}
        pattern = VNMPattern.parse(info["pattern"])
        header = [int(x) for x in t["vnm_header"].tolist()]
        if header[0] != FORMAT_VERSION or header[1:4] != [pattern.v, pattern.n, pattern.m]:
            raise ValueError(f"load_compressed: {name!r}: its header {header} does not match the index")
        w = VNMWeight(t["values"], t["columns"], t["meta"], None, pattern, tuple(info["shape"]))
        new = VNMLinear.from_weight(
            w, t["bias"], in_perm=t["in_perm"], out_perm=t["out_perm"], links=t["perm_links"], layout=layout
        )
        old = modules[name]
        new.from_conv1d = is_conv1d(old) or isinstance(old, Conv1DLinear) or getattr(old, "from_conv1d", False)
        new.train(old.training)
        if old is model:
            raise ValueError("load_compressed: the model itself is a compressed linear; wrap it in a module")
        _replace(model, old, new)
    # 2. everything else, assigned (a meta model gets real tensors)
    buffers = set(index["metadata"].get("non_persistent_buffers", []))
    state = {k: read(k) for k in rest if k not in buffers}
    result = model.load_state_dict(state, strict=False, assign=True)
    leftover = [k for k in result.missing_keys if not k.startswith(tuple(f"{n}." for n in layers))]
    if leftover or result.unexpected_keys:
        raise ValueError(f"load_compressed: state mismatch after loading: missing {leftover[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")  # fmt: skip
    for key in buffers:
        owner, _, name = key.rpartition(".")
        model.get_submodule(owner)._buffers[name] = read(key)
    _retie(model, {a: t for a, t in aliases.items() if a in state and t in state})
    check_links(model)
    share_storage_(model)
    return model
