"""End to end: dense torch.compile (inductor) vs the "vnm" backend at 2:4, 64:2:5 and 64:2:8.

    python benchmarks/bench_e2e.py                      # the issue's set, ~4 min on an H100
    python benchmarks/bench_e2e.py --llama-layers 32    # the whole 7B stack (long compiles)
    python benchmarks/bench_e2e.py --llama-layers 32 --models llama --decode-batches 1 --prefill 0 \
        --variants dense 64:2:8 64:2:5 --no-separate           # decode only, the whole stack
    python benchmarks/bench_e2e.py --dynamic            # one dynamic-shape graph, decode to prefill (below)
    python benchmarks/bench_e2e.py --dynamic --llama-layers 4 --tokens 1 16 512 2048

Models (random fp16 weights, shapes from transformers configs):
- a Llama-2-7B-shaped decoder (LlamaConfig: hidden 4096, MLP 11008, 32 heads), run as
  LlamaModel (the decoder stack; the 32000 x 4096 lm_head would stay dense in every variant):
  decode one token at batch 1 and 16 against a static KV cache of --kv-len tokens, and prefill
  of 2048 tokens at batch 1;
- DeiT-base (DeiTConfig defaults: hidden 768, MLP 3072, 224 px, patch 16) at batch 64.
Fewer layers than the real models (--llama-layers, --deit-layers) keep compile times inside a
device lease; every layer has the same shapes, so the per-layer speed-up is what the layer
count scales.

Every variant is compiled with fullgraph=True in inductor's default mode and timed under CUDA
graphs (kernels.benchmark.time_model_ms: do_bench_cudagraph, median). Sparse V:N:M variants run what a user runs:
--permute random (default) prunes a copy of the model with the real sparsify_ path (permute=True, the
input groups and MLP chains traced on one batch) whose permutation search is replaced by random
permutations (shared by siblings, as the search returns them; random weights give a search nothing
better to find, and its permutations are as scattered); --permute calibrated calibrates on random token
batches and runs sparsify_(permute=True) with the real search (its seconds recorded separately,
"search_s"); --permute none prunes at compile time without permutations
(options={"pattern": ..., "score": "abs"}), the earlier results' setting. --joint-permutations passes
VNMConfig(joint_permutations=True) (gate/up's output permutation = down_proj's input one, and v_proj's
output = o_proj's input one per head: no index op between them; not at decode with a KV cache, which
keeps v_proj's output in original order). --no-output-permutations passes VNMConfig(permute_outputs=False)
(input permutations only; with --joint-permutations the linked output ones stay). Timing does not depend on which weights are kept; it does on the permutations.
V:N:M variants run q/k/v and gate/up as one launch each (the fuse_siblings pass); at decode
batch 1 the "separate" variants (fuse_siblings=False) time the same kernels unfused.
"2:4 cuSPARSELt" is PyTorch's 2:4 path: the same layers pruned 2:4 (ABS) in a copy of the model,
run by torch._cslt_sparse_mm (algorithm searched per case) inside dense inductor; "2:4" is the
vnm backend's Triton kernel on N:4 storage.
Writes e2e.json, e2e.md and e2e.png to --out (default benchmarks/results/<gpu>/).

--dynamic (formerly benchmarks/bench_dynamic.py): one dynamic-shape "vnm" graph serving decode and prefill
sizes (the runtime dense/sparse switch). The Llama stack, pruned to the first V:N:M pattern of --variants
(default 64:2:8, ABS), compiled with dynamic=True as dense inductor and as the --dynamic-variants: "permuted"
(what users run: sparsify_(permute=True) as --permute says, default options, dense_fallback=True: each linear
runs sparse up to the token count where its measured choice says V:N:M wins, dense above it, decided inside the
op at run time), "compressed" (the permuted model after compress_: no dense weight held), "unpermuted" (the same
pattern with sparsify_(permute=False): what permutations cost) and "pergraph" (unpermuted with
dense_fallback=False: the choice made once per compiled graph from its example token count). No KV cache: each
call is a forward over --tokens positions at batch 1, the counts visited in the order given; the number of vnm
graphs compiled shows whether new sizes recompile. Reports median ms under CUDA graphs and each variant's
relative difference to the same pruned weights run eagerly. Writes dynamic.json/.md to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import sys
import time
from pathlib import Path

# LLAMA_SHAPES: hidden, intermediate, heads, KV heads, vocab
from vnm_compile.kernels.benchmark import LLAMA_SHAPES, save_results, time_model_ms

log = logging.getLogger("bench_e2e")

CSLT = "2:4 cuSPARSELt"
VARIANTS = ("dense", "64:2:8", "64:2:5", "2:4", CSLT)
# Run only when asked for (--variants): 64:2:16 is the pattern whose prefill beats dense cuBLAS
# with the gather-GEMM kernel (benchmarks/results/<gpu>/linear.md); "expanded" compiles with the
# expand_weights option (the expanded weights held: the gather GEMM from 2 tokens up);
# "interleaved" with the interleave_rows option (the decode kernel's row-interleaved layout held);
# The plain V:N:M variants run the backend's default sparse_tensor_cores="auto": on a GPU where they
# run, the mma.sp / wgmma.sp kernels at the token counts where the measured table (from `vnm bench` on
# this GPU) says they beat dense and the Triton kernels (the decode kernel at few tokens, the GEMM from
# a floor up; without vnm_tc_us timings in it, the Triton kernels only). "triton" compiles with
# sparse_tensor_cores=False (the Triton kernels only); "tc" with True (the same as "auto" on such a GPU;
# kept for the commands of earlier results). "permuted" runs the same pattern on weights pruned with random
# input and output channel permutations recorded (permuted_copy): the kernels then read each block's kept
# columns scattered over the input, as after sparsify_(..., VNMConfig(permute=True)).
EXTRA_VARIANTS = (
    "64:2:16", "64:2:8 expanded", "64:2:5 expanded", "64:2:8 interleaved", "64:2:5 interleaved", "64:2:8 tc",
    "64:2:5 tc", "64:2:16 tc", "64:2:8 triton", "64:2:5 triton", "64:2:8 permuted", "64:2:5 permuted",
)  # fmt: skip
# Decode batch 1 also runs the V:N:M variants without sibling fusion (fuse_siblings=False): the
# same kernels with q/k/v and gate/up as separate launches, to show what the fusion pass buys.
SEPARATE = ("64:2:8 separate", "64:2:5 separate")


def _compile(model, variant: str, smoke: bool = False):
    import torch

    if variant == "dense":
        return torch.compile(model, backend="eager" if smoke else "inductor", fullgraph=True, dynamic=False)
    pattern, *flags = variant.split()
    if "permuted" in flags:
        model = permuted_copy(model, pattern)
    options = {
        "pattern": pattern, "score": "abs", "inductor": not smoke, "fuse_siblings": "separate" not in flags,
        "expand_weights": "expanded" in flags, "interleave_rows": "interleaved" in flags,
        "sparse_tensor_cores": True if "tc" in flags else False if "triton" in flags else "auto",
    }  # fmt: skip
    return torch.compile(model, backend="vnm", options=options, fullgraph=True, dynamic=False)


def example_batch(args, name: str, batch: int = 1, seed: int = 0):
    """One input of the model ``name`` (random token ids or pixels) on the benchmark's device."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    if name == "llama":
        vocab = build_llama_config(args).vocab_size
        return torch.randint(0, vocab, (batch, 32 if args.smoke else 256), generator=gen).to(args.device)
    size = 64 if args.smoke else 224
    return torch.randn(batch, 3, size, size, generator=gen).to(device=args.device, dtype=args.dtype)


@contextlib.contextmanager
def _searched(mode: str, seed: int = 0):
    """sparsify_'s permutation search as ``mode`` runs it: "random" replaces it with random permutations (the
    input one shared by a unit, the output ones given by joint permutations kept); "calibrated" runs it.
    Yields a dict whose "search_s" is the time spent in it."""
    import torch

    from vnm_compile.calibration import permutation

    real = permutation.find_shared_permutation
    spent = {"search_s": 0.0}
    gen = torch.Generator().manual_seed(seed)

    def random_search(scores, pattern, rounds=2, *, fixed_out=None, in_segments=None, in_ties=None):
        device = scores[0].device
        base = scores[0].shape[1] if in_ties is None else in_ties.shape[1]
        in_perm = torch.randperm(base, generator=gen)
        if in_segments is not None:  # joint attention: random inside each head
            in_perm = torch.arange(base)
            for seg in in_segments.unique():
                idx = (in_segments == seg).nonzero().flatten()
                in_perm[idx] = idx[torch.randperm(idx.numel(), generator=gen)]
        in_perm = permutation._expand_ties(in_perm, in_ties).to(device)
        fixed = fixed_out or {}
        outs = [fixed[i] if i in fixed else torch.randperm(s.shape[0], generator=gen).to(device)
                for i, s in enumerate(scores)]  # fmt: skip
        return in_perm, outs

    def timed(*a, **k):
        start = time.perf_counter()
        try:
            return (random_search if mode == "random" else real)(*a, **k)
        finally:
            spent["search_s"] += time.perf_counter() - start

    permutation.find_shared_permutation = timed
    try:
        yield spent
    finally:
        permutation.find_shared_permutation = real


def _permutation_fields(args) -> dict:
    """The VNMConfig fields --joint-permutations and --no-output-permutations set."""
    return {"joint_permutations": args.joint_permutations, "permute_outputs": not args.no_output_permutations}


def sparsified(args, name: str, model, pattern: str) -> tuple[object, dict]:
    """A copy of ``model`` pruned to ``pattern`` through sparsify_ as --permute says (cached per model and
    pattern), and what it took: {"sparsify_s", "search_s", "permuted", "linked"}."""
    import copy

    from vnm_compile import VNMConfig, calibrate, sparsify_
    from vnm_compile.calibration.attention import find_attention_links
    from vnm_compile.calibration.chains import find_chains
    from vnm_compile.calibration.groups import find_input_groups

    key = (name, pattern)
    if key in args.sparsified:
        return args.sparsified[key]
    sparse = copy.deepcopy(model)
    batch = example_batch(args, name)
    start = time.perf_counter()
    with torch_no_grad(), _searched(args.permute) as spent:
        if args.permute == "random":
            config = VNMConfig(pattern, score="abs", **_permutation_fields(args))
            groups, chains = find_input_groups(sparse, batch), find_chains(sparse, batch)
            attention = find_attention_links(sparse, batch) if args.joint_permutations else []
            report = sparsify_(sparse, config, groups=groups, chains=chains, attention=attention, progress=False)
        else:
            config = VNMConfig(pattern, score="ria", **_permutation_fields(args))
            stats = calibrate(sparse, [example_batch(args, name, seed=s) for s in range(4)], progress=False)
            report = sparsify_(sparse, config, stats, progress=False)
    info = {"sparsify_s": time.perf_counter() - start, "search_s": spent["search_s"],
            "permuted": sum(r.permuted for r in report.sparsified),
            "linked": sum(bool(r.in_perm_from or r.out_perm_to) for r in report.sparsified)}  # fmt: skip
    log.warning("%s %s: sparsify_ (--permute %s) %s", name, pattern, args.permute, info)
    args.sparsified[key] = (sparse, info)
    return sparse, info


def _sparsified_variant(variant: str, permute: str) -> bool:
    """Whether ``variant`` runs on a model pruned by sparsify_ (--permute random / calibrated)."""
    from vnm_compile import VNMPattern

    if permute == "none" or variant in ("dense", CSLT):
        return False
    pattern, *flags = variant.split()
    return "permuted" not in flags and not VNMPattern.parse(pattern).is_nm


def permuted_copy(model, pattern: str, seed: int = 0):
    """A copy of ``model`` whose linears (those compile-time pruning would take: VNMConfig's ignore and
    min_numel) are pruned to ``pattern`` by ABS inside random input and output channel permutations,
    recorded as sparsify_ records them, so the compiler folds the permutations into the kernels' indices.
    Random permutations stand for what a permutation search returns on real weights (this benchmark's
    weights are random, so a search would choose no better): the kept columns of a block scattered over
    the whole input."""
    import copy

    import torch

    from vnm_compile import VNMConfig, vnm_mask
    from vnm_compile.sparsify import eligible_linears
    from vnm_compile.state import LinearSparsity, set_sparsity

    config = VNMConfig(pattern, score="abs", permute=False)
    sparse = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in eligible_linears(sparse, config)[0].values():
            w = module.weight
            in_perm = torch.randperm(w.shape[1], generator=gen).to(w.device)
            out_perm = torch.randperm(w.shape[0], generator=gen).to(w.device)
            permuted = vnm_mask(w.detach().abs().float()[out_perm][:, in_perm], config.pattern)
            mask = torch.empty_like(permuted)
            mask[out_perm.unsqueeze(1), in_perm.unsqueeze(0)] = permuted  # back to original coordinates
            w.mul_(mask)
            set_sparsity(module, LinearSparsity(config.pattern, mask, in_perm, out_perm, "abs"))
    return sparse


def _cslt_model(model, tokens: int):
    """A copy of ``model`` whose linears the vnm variants prune (VNMConfig defaults) are 2:4-pruned
    (ABS) and run cuSPARSELt (torch._cslt_sparse_mm, feature-major activations, the algorithm
    searched for this token count), compiled by inductor like the dense model."""
    import copy

    import torch
    from torch import nn

    from vnm_compile import VNMConfig, sparsify_
    from vnm_compile.state import get_sparsity

    class CSLT(nn.Module):
        def __init__(self, linear: nn.Linear) -> None:
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.register_buffer("compressed", torch._cslt_compress(linear.weight.detach().contiguous()))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
            x_fm = torch.randn(self.in_features, tokens, device=linear.weight.device, dtype=linear.weight.dtype)
            self.alg_id = int(torch._cslt_sparse_mm_search(self.compressed, x_fm, bias=self.bias))
            x = x_fm.t()[: min(tokens, 64)]  # a check that the layout is right: equal to F.linear
            want = nn.functional.linear(
                x.float(), linear.weight.float(), None if self.bias is None else self.bias.float()
            )
            got = self(x)
            err = ((got.float() - want).norm() / want.norm()).item()
            if not err < 1e-2 or not got.is_contiguous():
                raise RuntimeError(f"cuSPARSELt output differs from F.linear (rel. error {err:.2e})")

        def forward(self, x):
            # cuSPARSELt wants feature-major activations and returns (out, tokens): two transposes.
            # The output is made token-major again: left as the transposed view, SDPA saw column-major
            # q/k/v and fell back to its fp32 math path (2x slower prefill, measured); and
            # transpose_result=True failed in cuSPARSELt's search at 12672 tokens (H100, torch 2.11).
            x_fm = x.reshape(-1, self.in_features).t().contiguous()
            y = torch._cslt_sparse_mm(self.compressed, x_fm, bias=self.bias, alg_id=self.alg_id)
            return y.t().contiguous().view(*x.shape[:-1], self.out_features)

    sparse = copy.deepcopy(model)
    sparsify_(sparse, VNMConfig("2:4", score="abs", permute=False), progress=False)
    swapped = 0
    for module in list(sparse.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and get_sparsity(child.weight) is not None:
                setattr(module, name, CSLT(child))
                swapped += 1
    return sparse, swapped


def _time(fn, smoke: bool = False) -> tuple[float, float]:
    """(first call seconds = compile, median ms under a CUDA graph)."""
    import torch

    sync = (lambda: None) if smoke else torch.cuda.synchronize
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    fn()  # second call: no compile left, kernels autotuned, before the graph capture
    sync()
    if smoke:  # CPU check of the code paths: one timed call
        t0 = time.perf_counter()
        fn()
        return first, (time.perf_counter() - t0) * 1e3
    ms = time_model_ms(fn, rep_ms=300)
    return first, ms


def _lowered() -> tuple[int, int]:
    from vnm_compile.backend import last_report

    r = last_report()
    return (len(r.lowered), len(r.dense)) if r is not None else (0, 0)


def _cleanup() -> None:
    import torch

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_llama_config(args):
    """The shapes of ``args.shapes`` (default Llama-2-7B; --smoke: tiny ones) with --llama-layers layers."""
    from transformers import LlamaConfig

    shape = (256, 704, 4, 4, 512) if args.smoke else LLAMA_SHAPES[getattr(args, "shapes", "llama2-7b")]
    cfg = LlamaConfig(
        hidden_size=shape[0],
        intermediate_size=shape[1],
        num_attention_heads=shape[2],
        num_key_value_heads=shape[3],
        num_hidden_layers=args.llama_layers,
        vocab_size=shape[4],
        max_position_embeddings=4096,
    )
    return cfg


def build_llama(args):
    """The Llama-2-7B-shaped decoder stack (LlamaModel: no lm_head) with random weights."""
    import torch
    from transformers import LlamaModel

    torch.manual_seed(0)
    with torch.device(args.device):
        return LlamaModel(build_llama_config(args)).to(args.dtype).eval()


def build_deit(args):
    """DeiT-base shapes (DeiTConfig defaults) with random weights."""
    import torch
    from transformers import DeiTConfig, DeiTModel

    cfg = DeiTConfig(num_hidden_layers=args.deit_layers)
    if args.smoke:
        cfg = DeiTConfig(
            num_hidden_layers=1, hidden_size=256, intermediate_size=512, num_attention_heads=4, image_size=64
        )
    torch.manual_seed(0)
    with torch.device(args.device):
        return DeiTModel(cfg, add_pooling_layer=False).to(args.dtype).eval()


def skip_unneeded_masks() -> list[str]:
    """Compiled DeiT and Llama prefill run SDPA without a materialized mask, as eager transformers does.

    transformers 5.17 (the GPU machine's) builds the full attention mask whenever it is traced
    (masking_utils' ``is_tracing()`` blocks the skip; 5.24 skips it under torch.compile too), so compiled
    SDPA gets an explicit mask. DeiT's 198-token mask rows are not 16-byte aligned, which sends SDPA to
    its float32 math path: 1.8 of 4.3 ms of the dense 4-layer DeiT-base at batch 64 on an H200
    (torch.profiler: two float32 FFMA batched GEMMs and a softmax kernel per layer), where eager runs
    cuDNN flash attention. DeiT never masks, and a prefill without cache or padding is plain causal
    attention (SDPA's ``is_causal``), so both get no mask; decode (a static cache) keeps its mask.
    Applied once for every variant, dense included. Returns the functions replaced."""
    import transformers.models.deit.modeling_deit as deit
    import transformers.models.llama.modeling_llama as llama

    patched = []
    # each builder's inputs that must all be None (alternatives: the names across transformers versions)
    for module, name, keys in (
        (deit, "create_bidirectional_mask", (("attention_mask",),)),
        (llama, "create_causal_mask", (("attention_mask",), ("past_key_values", "cache"))),
    ):
        make = getattr(module, name, None)  # transformers before 5 has no such function: nothing to do
        if make is None or getattr(make, "_vnm_unmasked", False):
            continue

        def no_mask(*args, _make=make, _keys=keys, **kwargs):
            # only when called as these models call it: by keyword, each input named and None
            unneeded = not args and all(any(k in kwargs for k in alt) for alt in _keys)
            if unneeded and all(kwargs.get(k) is None for alt in _keys for k in alt):
                return None
            return _make(*args, **kwargs)

        no_mask._vnm_unmasked = True
        setattr(module, name, no_mask)
        patched.append(f"{module.__name__}.{name}")
    return patched


def llama_decode(args, model, batch: int):
    """One decode step of ``batch`` sequences against a static KV cache holding --kv-len tokens.

    transformers' StaticCache advances a device-side write counter every call (CUDA-graph replays
    included), so each timed call first sets it back to --kv-len: one tiny fill per layer, timed
    on its own and subtracted (``overhead_ms``).
    """
    import torch
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=args.kv_len + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=args.device)
    pos = torch.tensor([args.kv_len], device=args.device)
    with torch.no_grad():  # allocate the cache eagerly, outside any compiled graph
        model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
    counters = [layer.cumulative_length for layer in cache.layers]

    def reset():
        for c in counters:
            c.fill_(args.kv_len)

    def call(compiled):
        reset()
        return compiled(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)

    call.overhead = reset
    return call, batch


def llama_prefill(args, model, batch: int):
    import torch

    ids = torch.randint(0, model.config.vocab_size, (batch, args.prefill), device=args.device)
    return (lambda c: c(input_ids=ids, use_cache=False)), batch * args.prefill


def deit_forward(args, model, batch: int):
    import torch

    size = model.config.image_size
    x = torch.randn(batch, 3, size, size, device=args.device, dtype=args.dtype)
    tokens = batch * ((size // model.config.patch_size) ** 2 + 2)
    return (lambda c: c(pixel_values=x)), tokens


def _skipped(rec: dict, reason: str) -> dict:
    rec["skipped"] = reason
    log.warning("%s", rec)
    return rec


def run_cases(args) -> list[dict]:
    """Every case x every variant, the issue's targets first (decode batch 1, DeiT), within --budget-s.

    Dynamo is reset between cases, so each is compiled for its static shapes (as served under CUDA
    graphs); the masks and compressed weights are cached per weight, so re-lowering is cheap.
    """
    if args.skip_masks:
        log.warning("no materialized attention masks where none is needed: %s", skip_unneeded_masks())
    models = {}
    if "llama" in args.models:
        models["llama"] = build_llama(args)
    if "deit" in args.models:
        models["deit"] = build_deit(args)
    cases = []
    if "llama" in models and args.decode_batches:
        cases.append(("llama", "decode", args.decode_batches[0], llama_decode))
    if "deit" in models:
        cases.append(("deit", "forward", args.deit_batch, deit_forward))
    if "llama" in models:
        cases += [("llama", "decode", b, llama_decode) for b in args.decode_batches[1:]]
        if args.prefill > 0:
            cases.append(("llama", "prefill", 1, llama_prefill))
    records: list[dict] = []
    args.sparsified = {}
    for name, phase, batch, make in cases:
        model = models[name]
        call, tokens = make(args, model, batch)
        for variant in args.variants + (SEPARATE if (phase, batch) == ("decode", 1) and args.separate else ()):
            rec = {"model": name, "phase": phase, "batch": batch, "tokens": tokens, "variant": variant}
            if time.perf_counter() - args.t0 > args.budget_s:
                records.append(_skipped(rec, "time budget"))
                continue
            _cleanup()
            if variant == CSLT:
                from vnm_compile.kernels.cusparselt import cusparselt_available

                if args.smoke or not cusparselt_available():
                    records.append(_skipped(rec, "no cuSPARSELt here"))
                    continue
                try:
                    cslt, swapped = _cslt_model(model, tokens)
                except RuntimeError as err:  # e.g. cuSPARSELt refuses this token count
                    records.append(_skipped(rec, f"cuSPARSELt failed: {str(err).splitlines()[0][:80]}"))
                    continue
                compiled = _compile(cslt, "dense", args.smoke)
            elif _sparsified_variant(variant, args.permute):
                sparse, info = sparsified(args, name, model, variant.split()[0])
                rec.update(info)
                compiled = _compile(sparse, variant, args.smoke)
            else:
                compiled = _compile(model, variant, args.smoke)
            with torch_no_grad():
                try:
                    compile_s, ms = _time(lambda compiled=compiled, call=call: call(compiled), args.smoke)
                except RuntimeError as err:
                    if variant != CSLT:
                        raise
                    records.append(_skipped(rec, f"cuSPARSELt failed: {str(err).splitlines()[0][:80]}"))
                    continue
                overhead = getattr(call, "overhead", None)
                if overhead is not None:
                    rec["overhead_ms"] = _time(overhead, args.smoke)[1]
                    ms -= rec["overhead_ms"]
            lowered, dense = _lowered() if variant not in ("dense", CSLT) else (0, 0)
            if variant == CSLT:
                lowered = swapped
            rec.update(ms=ms, compile_s=compile_s, lowered=lowered, dense_linears=dense)
            log.warning("%s", rec)
            records.append(rec)
            _save_partial(args, records)
            del compiled
    _cleanup()
    return records


def torch_no_grad():
    import torch

    return torch.no_grad()


def _with_speedups(records: list[dict]) -> list[dict]:
    dense = {
        (r["model"], r["phase"], r["batch"]): r["ms"] for r in records if r.get("variant") == "dense" and "ms" in r
    }
    for r in records:
        base = dense.get((r["model"], r["phase"], r["batch"]))
        if "ms" in r and base:
            r["speedup"] = base / r["ms"]
    return records


TARGETS = {
    ("llama", "decode", 1, "64:2:8"): 2.0,
    ("llama", "decode", 1, "64:2:5"): 1.5,
    ("deit", "forward", 64, "64:2:8"): 1.4,
}


def _permute_note(cfg: dict) -> str:
    mode = cfg.get("permute", "none")
    if mode == "none":
        return "V:N:M weights pruned at compile time, unpermuted. "
    how = "random permutations" if mode == "random" else "the permutation search on calibration batches"
    joint = " with joint MLP and attention permutations" if cfg.get("joint_permutations") else ""
    if cfg.get("permute_outputs") is False:
        joint += ", input permutations only (permute_outputs=False)"
    return f"V:N:M weights pruned by sparsify_(permute=True){joint}, {how} (--permute {mode}). "


def _md(result: dict) -> str:
    cfg = result["config"]
    lines = [
        f"# End-to-end: dense torch.compile vs vnm backend on {result['gpu']}",
        "",
        f"torch {result['versions']['torch']}, triton {result['versions']['triton']}, "
        f"transformers {result['versions']['transformers']}, CUDA {result['versions']['cuda']}. "
        f"Command: `{result['command']}`",
        "",
        f"{cfg.get('shapes', 'llama2-7b')}-shaped decoder stack, {cfg['llama_layers']} layers (LlamaModel, no lm_head), fp16; "
        f"decode against a {cfg['kv_len']}-token static KV cache, prefill {cfg['prefill']} tokens. "
        f"DeiT-base shapes, {cfg['deit_layers']} of 12 layers, batch {cfg['deit_batch']}, 224 px, fp16. "
        "All compiled fullgraph in inductor's default mode; median of CUDA-graph replays. Decode times "
        "exclude the StaticCache write-counter reset each replay needs (timed alone, subtracted). "
        "The dispatcher's measured table (kernels.dispatch.sparse_token_limit) decides per linear: sparse, "
        "dense, or sparse up to a token count; each case is compiled for its fixed token count. "
        "V:N:M variants run the default sparse_tensor_cores='auto' (the mma.sp / wgmma.sp kernels where the "
        'table says they win); "triton" variants run with the option off, "tc" with True. '
        'V:N:M variants fuse q/k/v and gate/up into one launch each; "separate" variants do not '
        "(fuse_siblings=False). "
        + _permute_note(cfg)
        + (
            "Attention: SDPA without a materialized mask for DeiT and the prefill, as in eager "
            "(bench_e2e.skip_unneeded_masks; every variant)."
            if cfg.get("skip_masks")
            else "Attention: the masks transformers materializes under torch.compile kept (--keep-masks)."
        ),
        "",
        "| model | phase | batch | variant | ms | speed-up vs dense | target | compile s | linears lowered / dense |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["records"]:
        if "skipped" in r:
            lines.append(
                f"| {r['model']} | {r['phase']} | {r['batch']} | {r['variant']} | skipped: {r['skipped']} | | | | |"
            )
            continue
        target = TARGETS.get((r["model"], r["phase"], r["batch"], r["variant"]))
        t = f">= {target:.1f}x" if target else ""
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        low = f"{r['lowered']} / {r['dense_linears']}" if r["variant"] != "dense" else ""
        lines.append(
            f"| {r['model']} | {r['phase']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {sp} | {t} | {r['compile_s']:.1f} | {low} |"
        )
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no %s", path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if "speedup" in r and r["variant"] != "dense"]
    groups = sorted({(r["model"], r["phase"], r["batch"]) for r in recs}, key=str)
    variants = [v for v in VARIANTS + EXTRA_VARIANTS if v != "dense" and any(r["variant"] == v for r in recs)]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        ys = [
            next((r["speedup"] for r in recs if (r["model"], r["phase"], r["batch"]) == g and r["variant"] == v), 0)
            for g in groups
        ]
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{m} {p}\nbatch {b}" for m, p, b in groups])
    ax.set_ylabel("speed-up vs dense torch.compile")
    ax.set_title(f"vnm backend end to end, {result['gpu']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DYNAMIC_VARIANTS = ("permuted", "compressed", "unpermuted", "pergraph")


def _dynamic_models(args, model, pattern: str) -> tuple[dict, dict | None]:
    """The --dynamic variants' pruned models, each with the module its outputs are checked against (the same
    pruned weights run eagerly, masked): {name: (model, options, reference module)}, and what sparsify_ with
    permutations took (``sparsified``'s info; None without a permuted variant)."""
    import copy

    from vnm_compile import VNMConfig, compress_, sparsify_

    wanted = set(args.dynamic_variants)
    out, info = {}, None
    if wanted & {"unpermuted", "pergraph"}:
        plain = copy.deepcopy(model)
        report = sparsify_(plain, VNMConfig(pattern, score="abs", permute=False), progress=False)
        log.warning("unpermuted: %s", report.summary())
        if "unpermuted" in wanted:
            out["unpermuted"] = (plain, {}, plain)
        if "pergraph" in wanted:
            out["pergraph"] = (plain, {"dense_fallback": False}, plain)
    if wanted & {"permuted", "compressed"}:
        if args.permute == "none":
            raise SystemExit("--dynamic-variants permuted / compressed need --permute random or calibrated")
        permuted, info = sparsified(args, "llama", model, pattern)
        if "permuted" in wanted:
            out["permuted"] = (permuted, {}, permuted)
        if "compressed" in wanted:
            out["compressed"] = (compress_(copy.deepcopy(permuted)), {}, permuted)
    return {name: out[name] for name in args.dynamic_variants}, info


def run_dynamic(args) -> dict:
    """The --dynamic case (module docstring): the result dict dynamic.json holds."""
    import torch

    from vnm_compile.backend import clear_reports, reports
    from vnm_compile.kernels.benchmark import command_line, environment, versions

    env = environment(args.device, args.dtype)  # the commit when the run starts (it takes minutes)
    pattern = next(v.split()[0] for v in args.variants if v not in ("dense", CSLT))
    args.sparsified = {}
    model = build_llama(args)
    variants, sparsify_info = _dynamic_models(args, model, pattern)
    dense = torch.compile(model, backend="eager" if args.smoke else "inductor", dynamic=True, fullgraph=True)
    clear_reports()
    smoke = {"inductor": False, "force_sparse": True} if args.smoke else {}  # smoke: the op runs on the CPU
    compiled = {
        name: torch.compile(m, backend="vnm", options={**smoke, **opts}, dynamic=True, fullgraph=True)
        for name, (m, opts, _) in variants.items()
    }
    rows = []
    with torch.no_grad():
        for t in args.tokens:
            ids = torch.randint(0, model.config.vocab_size, (1, t), device=args.device)

            def call(c, ids=ids):
                return c(input_ids=ids, use_cache=False).last_hidden_state

            timed = {"dense": _time(lambda: call(dense), args.smoke)}  # (first call s, ms)
            diff, eager = {}, {}  # eager: the masked weights through F.linear, once per reference module
            for name, c in compiled.items():
                timed[name] = _time(lambda c=c: call(c), args.smoke)
                module = variants[name][2]
                if id(module) not in eager:
                    eager[id(module)] = call(module).float()
                ref = eager[id(module)]
                diff[name] = ((call(c).float() - ref).norm() / ref.norm()).item()
            ms = {name: v[1] for name, v in timed.items()}
            rows.append({"tokens": t, "ms": ms, "first_call_s": {name: v[0] for name, v in timed.items()},
                         "rel_diff_vs_eager": diff, "vnm_graphs_so_far": len(reports())})  # fmt: skip
            log.warning(
                "tokens %5d: dense %.3f ms, %s", t, ms["dense"],
                ", ".join(f"{n} {ms[n]:.3f} ms ({ms['dense'] / ms[n]:.2f}x)" for n in compiled),
            )  # fmt: skip
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu (smoke)",
        "versions": versions(env),
        "command": command_line("python "),
        "environment": env,
        "config": {
            "layers": args.llama_layers,
            "pattern": pattern,
            "tokens": list(args.tokens),
            "shapes": args.shapes,
            "variants": list(compiled),
            "permute": args.permute,
            "joint_permutations": args.joint_permutations,
            "permute_outputs": not args.no_output_permutations,
            "sparsify": sparsify_info,
            "out": str(args.out),
        },
        "vnm_graphs": len(reports()),
        "reports": [r.summary() for r in reports()],
        "rows": rows,
        "wall_s": time.perf_counter() - args.t0,
    }


_DYNAMIC_NOTES = {
    "permuted": "permuted = the weights as sparsify_(permute=True) leaves them ({how}), vnm backend, default "
    "options (dense_fallback=True: sparse or dense decided in the op at run time)",
    "compressed": "compressed = the permuted model after compress_ (no dense weights), vnm backend, default options",
    "unpermuted": "unpermuted = the same pattern pruned by sparsify_(permute=False), vnm backend, default options",
    "pergraph": "pergraph = unpermuted with dense_fallback=False (sparse or dense decided once per compiled graph)",
}


def _dynamic_md(result: dict) -> str:
    cfg = result["config"]
    v = result["versions"]
    names = cfg["variants"]
    how = {"random": "random input and output permutations, shared by siblings",
           "calibrated": "the permutation search on calibration batches"}.get(cfg.get("permute"), "")  # fmt: skip
    if cfg.get("joint_permutations"):
        how += ", joint permutations"
    if cfg.get("permute_outputs") is False:
        how += ", input permutations only (no output permutation)"
    notes = "; ".join(_DYNAMIC_NOTES[n].format(how=how) for n in names if n in _DYNAMIC_NOTES)
    lines = [
        f"# One dynamic-shape graph, decode to prefill, on {result['gpu']}",
        "",
        f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, CUDA {v['cuda']}. "
        f"Command: `{result['command']}`",
        "",
        f"{cfg['shapes']}-shaped LlamaModel, {cfg['layers']} layers, fp16, batch 1, no KV cache, {cfg['pattern']} "
        "(ABS); every variant compiled once with dynamic=True, then called at each token count in this order. "
        f"dense = inductor. {notes}. Median ms of CUDA-graph replays; speed-up = dense ms / variant ms; rel. "
        "diff = ||y - y_eager|| / ||y_eager||, y_eager the same pruned weights run eagerly (masked, F.linear).",
        "",
        "| tokens | dense ms | " + " | ".join(f"{n} ms | {n} speed-up" for n in names) + " | rel. diff | vnm graphs |",
        "| ---: | ---: | " + " | ".join("---: | ---:" for _ in names) + " | ---: | ---: |",
    ]
    for r in result["rows"]:
        ms = r["ms"]
        diff = r["rel_diff_vs_eager"]
        cells = " | ".join(f"{ms[n]:.3f} | {ms['dense'] / ms[n]:.2f}x" for n in names)
        lines.append(
            f"| {r['tokens']} | {ms['dense']:.3f} | {cells} | {' / '.join(f'{diff[n]:.1e}' for n in names)} "
            f"| {r['vnm_graphs_so_far']} |"
        )
    if cfg.get("sparsify"):
        lines += ["", f"sparsify_: {cfg['sparsify']}"]
    lines += ["", "Compile reports:", "", "```", *result["reports"], "```"]
    return "\n".join(lines) + "\n"


def _result(args, records: list[dict]) -> dict:
    import torch

    from vnm_compile.kernels.benchmark import command_line, environment, versions

    env = environment(args.device, args.dtype)
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)",
        "versions": versions(env),
        "command": command_line("python "),
        "environment": env,
        "config": {
            "shapes": args.shapes,
            "llama_layers": args.llama_layers,
            "deit_layers": args.deit_layers,
            "kv_len": args.kv_len,
            "prefill": args.prefill,
            "decode_batches": args.decode_batches,
            "deit_batch": args.deit_batch,
            "variants": list(args.variants),
            "skip_masks": args.skip_masks,
            "permute": args.permute,
            "joint_permutations": args.joint_permutations,
            "permute_outputs": not args.no_output_permutations,
        },
        "records": _with_speedups(records),
        "wall_s": time.perf_counter() - args.t0,
    }


def _save_partial(args, records: list[dict]) -> None:
    save_results(args.out, "e2e.partial", _result(args, list(records)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--deit-layers", type=int, default=4)
    parser.add_argument("--kv-len", type=int, default=1024, help="tokens already in the KV cache when decoding")
    parser.add_argument("--prefill", type=int, default=2048, help="prefill tokens (0: no prefill case)")
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16], help="none: no decode case")
    parser.add_argument("--deit-batch", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip cases that would start after this")
    parser.add_argument("--models", nargs="+", default=["llama", "deit"], choices=["llama", "deit"])
    parser.add_argument("--shapes", choices=sorted(LLAMA_SHAPES), default="llama2-7b", help="the Llama model's shapes")
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + EXTRA_VARIANTS, help="dense comes first"
    )
    parser.add_argument(
        "--no-separate", dest="separate", action="store_false", help="skip the unfused variants at decode batch 1"
    )
    parser.add_argument(
        "--keep-masks", dest="skip_masks", action="store_false",
        help="keep the attention masks transformers materializes under torch.compile (see skip_unneeded_masks)",
    )  # fmt: skip
    parser.add_argument(
        "--permute", choices=["none", "random", "calibrated"], default="random",
        help="how the V:N:M variants' weights are permuted (module docstring); default random",
    )  # fmt: skip
    parser.add_argument(
        "--joint-permutations", action="store_true", help="sparsify_ with VNMConfig(joint_permutations=True)"
    )
    parser.add_argument(
        "--no-output-permutations", action="store_true",
        help="sparsify_ with VNMConfig(permute_outputs=False): input permutations only",
    )  # fmt: skip
    parser.add_argument(
        "--dynamic", action="store_true", help="one dynamic-shape graph over --tokens (module docstring)"
    )
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[1, 16, 2048, 7, 300], help="--dynamic: token counts, in order"
    )
    parser.add_argument(
        "--dynamic-variants",
        nargs="+",
        choices=DYNAMIC_VARIANTS,
        default=["permuted", "compressed", "unpermuted"],
        help="--dynamic: the vnm variants compiled beside dense (module docstring)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on the CPU, no inductor: checks the code paths"
    )
    args = parser.parse_args(argv)
    args.variants = ("dense", *[v for v in args.variants if v != "dense"])  # speed-ups need the dense time
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.t0 = time.perf_counter()

    import torch

    import vnm_compile  # noqa: F401  (registers the backend)
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    if args.smoke:
        args.device, args.dtype = "cpu", torch.float32
        args.kv_len, args.prefill, args.deit_batch = (
            min(args.kv_len, 64),
            min(args.prefill, 32),
            min(args.deit_batch, 2),
        )
        args.out = args.out or Path("/tmp/bench_e2e_smoke")
    elif not torch.cuda.is_available():
        print("bench_e2e needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 1
    else:
        args.device, args.dtype = "cuda", torch.float16
    args.out = args.out or results_dir() / gpu_slug()
    if args.dynamic:
        if not any(v not in ("dense", CSLT) for v in args.variants):
            parser.error("--dynamic needs a V:N:M pattern in --variants")
        if args.smoke:
            args.tokens = [min(t, 32) for t in args.tokens]
        result = run_dynamic(args)
        save_results(args.out, "dynamic", result, _dynamic_md(result))
        return 0
    records = run_cases(args)
    result = _result(args, records)
    markdown = _md(result)
    save_results(args.out, "e2e", result, markdown, echo=False)
    _plot(result, args.out / "e2e.png")
    partial = args.out / "e2e.partial.json"
    if partial.exists():
        partial.unlink()
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
