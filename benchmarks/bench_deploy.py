"""Compressed deployment: GPU memory, checkpoint loading and speed of the compressed form (compress_)
against dense, today's masked path (sparsify_ then the vnm backend) and cuSPARSELt 2:4.

    python benchmarks/bench_deploy.py memory --layers 32      # Llama-2-7B-shaped: bytes held, save / load
    python benchmarks/bench_deploy.py speed --layers 2        # decode b1 / b16 and 2048-token prefill

The user's path: random fp16 weights in a transformers LlamaModel (the decoder stack), pruned by sparsify_'s
own per-layer pruning with realistic permutations (random, input permutations shared by q/k/v and by
gate/up as calibrate() groups them; the permutation search itself is timed by bench_permutation.py), then
``compress_`` (the sparse-tensor-core layout where it runs). Memory is torch.cuda.memory_allocated after a
warm-up forward (temporaries freed). Speed: torch.compile(fullgraph, static shapes), timed under CUDA
graphs (median), decode against a static KV cache (bench_e2e's cases). Writes deploy_<mode>.json/.md to
--out (default benchmarks/results/<gpu>/).
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_e2e as e2e  # noqa: E402

log = logging.getLogger("bench_deploy")
PATTERNS = ("64:2:8", "64:2:5")
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def random_sparsify_(model, pattern: str, seed: int = 0, layers=None, permute: bool = True) -> int:
    """sparsify_'s pruning of every decoder linear with random permutations (siblings share the input one;
    ``permute=False``: none, the kept columns of a block inside one M-column group)."""
    import torch

    from vnm_compile import VNMConfig
    from vnm_compile.sparsify import LayerReport, _apply_mask, _plan_mask

    config = VNMConfig(pattern, score="abs")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    count = 0
    for layer in model.layers if layers is None else layers:
        groups = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], [layer.self_attn.o_proj],
                  [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]]  # fmt: skip
        for group in groups:
            dev = group[0].weight.device
            in_perm = torch.randperm(group[0].in_features, generator=gen).to(dev)
            for lin in group:
                out_perm = torch.randperm(lin.out_features, generator=gen).to(dev)
                perms = (in_perm, out_perm) if permute else (None, None)
                report = LayerReport("", tuple(lin.weight.shape))
                with torch.no_grad():  # sparsify_'s own two steps: choose the mask, then apply it
                    mask = _plan_mask(lin.weight.detach().abs().float(), perms, config, report)
                    _apply_mask(lin, mask, perms, config.score, report)
                count += 1
    return count


def _allocated_after_warmup(model, device) -> int:
    import torch

    ids = torch.randint(0, model.config.vocab_size, (1, 16), device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _linear_bytes(model) -> int:
    from torch import nn

    from vnm_compile.deploy import VNMLinear

    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += sum(t.numel() * t.element_size() for t in m.parameters(recurse=False))
        elif isinstance(m, VNMLinear):
            total += m.nbytes
    return total


def _cslt_bytes(model) -> int:
    """Bytes cuSPARSELt's 2:4 compression holds for the same linears (torch._cslt_compress, plus bias)."""
    import torch
    from torch import nn

    sizes = {}
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            key = (m.out_features, m.in_features)
            if key not in sizes:
                c = torch._cslt_compress(m.weight.detach().contiguous())
                sizes[key] = c.numel() * c.element_size()
                del c
            total += sizes[key] + (0 if m.bias is None else m.bias.numel() * m.bias.element_size())
    return total


def torch_no_grad_decorator(fn):
    def run(*a, **k):
        import torch

        with torch.no_grad():
            return fn(*a, **k)

    return run


@torch_no_grad_decorator
def run_memory(args) -> dict:
    import torch

    from vnm_compile.deploy import compress_, load_compressed, memory_report, save_compressed
    from vnm_compile.kernels.cusparselt import cusparselt_available

    rows = []
    for pattern in args.patterns:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        model = e2e.build_llama(args)
        dense_all = _allocated_after_warmup(model, args.device)
        dense_linear = _linear_bytes(model)
        cslt = _cslt_bytes(model) if cusparselt_available() else None
        t0 = time.perf_counter()
        random_sparsify_(model, pattern)
        prune_s = time.perf_counter() - t0
        masked_all = _allocated_after_warmup(model, args.device)
        t0 = time.perf_counter()
        compress_(model, layout=args.layout, progress=False)
        compress_s = time.perf_counter() - t0
        comp_all = _allocated_after_warmup(model, args.device)
        comp_linear = _linear_bytes(model)
        rec = {"pattern": pattern, "layers": args.layers, "dense_bytes": dense_all, "dense_linear_bytes": dense_linear,
               "masked_bytes": masked_all, "compressed_bytes": comp_all, "compressed_linear_bytes": comp_linear,
               "linear_ratio": comp_linear / dense_linear, "model_ratio": comp_all / dense_all,
               "cslt_linear_bytes": cslt, "cslt_linear_ratio": None if cslt is None else cslt / dense_linear,
               "prune_s": prune_s, "compress_s": compress_s}  # fmt: skip
        log.warning("%s", memory_report(model).splitlines()[-1])
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            t0 = time.perf_counter()
            save_compressed(model, tmp)
            rec["save_s"] = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in Path(tmp).iterdir())
            del model
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            from transformers import LlamaModel

            with torch.device("meta"):
                fresh = LlamaModel(e2e.build_llama_config(args))
            t0 = time.perf_counter()
            load_compressed(fresh, tmp, device=args.device, layout=args.layout)
            torch.cuda.synchronize()
            load_s = time.perf_counter() - t0
            rec.update(checkpoint_bytes=size, load_s=load_s, load_gb_s=size / load_s / 1e9,
                       load_peak_gpu_bytes=torch.cuda.max_memory_allocated(),
                       peak_host_rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)  # fmt: skip
            rec["loaded_bytes"] = _allocated_after_warmup(fresh.half(), args.device)
            del fresh
        gc.collect()
        torch.cuda.empty_cache()
        log.warning("%s", rec)
        rows.append(rec)
    return {"mode": "memory", "records": rows}


def _llama70b_config(args):
    """LLAMA_SHAPES["llama2-70b"] with --layers decoder layers."""
    return e2e.build_llama_config(argparse.Namespace(shapes="llama2-70b", smoke=False, llama_layers=args.layers))


def _build_big(args, cfg, pattern: str):
    """The model on the meta device, then decoder layer by decoder layer: random dense weights on the GPU,
    pruned (random permutations), compressed; (model, seconds per layer)."""
    import torch
    from transformers import LlamaModel
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from vnm_compile.deploy import compress_

    with torch.device("meta"):
        model = LlamaModel(cfg).eval()
    for module in (model.embed_tokens, model.norm):
        module.to_empty(device=args.device)
    model.embed_tokens.weight.normal_(0, 0.02)
    model.norm.weight.fill_(1.0)
    with torch.device(args.device):
        model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    model.half()
    layer_s = []
    for i, layer in enumerate(model.layers):
        t1 = time.perf_counter()
        layer.to_empty(device=args.device)
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.data = torch.ones(p.shape, device=args.device, dtype=args.dtype)
            else:
                p.data = torch.randn(p.shape, device=args.device, dtype=args.dtype) * 0.02
        random_sparsify_(model, pattern, seed=i, layers=[layer])
        compress_(layer, layout=args.layout, progress=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        layer_s.append(time.perf_counter() - t1)
        if i % 10 == 0:
            log.warning("%s: layer %d/%d built in %.2f s, %.1f GB allocated", pattern, i + 1, len(model.layers),
                        layer_s[-1], torch.cuda.memory_allocated() / 1e9)  # fmt: skip
    return model, layer_s


def _decode_ms(args, model, cfg) -> float:
    """Median ms of one decode step (batch 1, --kv-len cached tokens) replayed as a CUDA graph."""
    import torch
    from transformers import StaticCache

    from vnm_compile.kernels.benchmark import time_model_ms

    cache = StaticCache(config=cfg, max_cache_len=args.kv_len + 8)
    ids = torch.randint(0, cfg.vocab_size, (1, 1), device=args.device)
    pos = torch.tensor([args.kv_len], device=args.device)
    model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)
    counters = [layer.cumulative_length for layer in cache.layers]

    def step():
        for c in counters:
            c.fill_(args.kv_len)
        return model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True)

    step()
    return time_model_ms(step)


def _dense_layer_ms(args, model, cfg) -> float:
    """Median ms of one dense decoder layer of the same shapes at the same decode step."""
    import torch
    from transformers import StaticCache

    from vnm_compile.kernels.benchmark import time_model_ms

    layer = type(model.layers[0])(cfg, 0).to(device=args.device, dtype=args.dtype).eval()
    hidden = torch.randn(1, 1, cfg.hidden_size, device=args.device, dtype=args.dtype)
    pos = torch.tensor([args.kv_len], device=args.device)
    emb = model.rotary_emb(hidden, pos.view(1, 1))
    cache = StaticCache(config=cfg, max_cache_len=args.kv_len + 8)

    layer(hidden, position_embeddings=emb, past_key_values=cache, cache_position=pos)
    counters = [c.cumulative_length for c in cache.layers if hasattr(c, "cumulative_length")]

    def step():  # the cache's write position reset each replay, as in _decode_ms
        for c in counters:
            c.fill_(args.kv_len)
        return layer(hidden, position_embeddings=emb, past_key_values=cache, cache_position=pos)

    step()
    return time_model_ms(step)


@torch_no_grad_decorator
def run_big(args) -> dict:
    """A Llama-2-70B-shaped model built layer by layer on one GPU: each decoder layer's random dense weights are
    generated on the GPU, pruned (random permutations), compressed, and dropped; never more than one dense layer
    there. Then decode at batch 1 against a --kv-len token static KV cache, timed as one CUDA graph."""
    import torch

    if args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
    cfg = _llama70b_config(args)
    rows = []
    for pattern in args.patterns:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model, layer_s = _build_big(args, cfg, pattern)
        rec = {"pattern": pattern, "layers": args.layers, "kv_len": args.kv_len, "build_s": time.perf_counter() - t0,
               "layer_build_s_median": sorted(layer_s)[len(layer_s) // 2], "weights_bytes": torch.cuda.memory_allocated(),
               "build_peak_bytes": torch.cuda.max_memory_allocated()}  # fmt: skip
        ms = _decode_ms(args, model, cfg)
        log.warning("%s: decode %.3f ms per token, peak %.1f GB", pattern, ms, torch.cuda.max_memory_allocated() / 1e9)
        rec.update(decode_peak_bytes=torch.cuda.max_memory_allocated(), decode_ms=ms, tokens_per_s=1e3 / ms,
                   per_layer_ms=ms / args.layers, dense_layer_ms=_dense_layer_ms(args, model, cfg))  # fmt: skip
        log.warning("%s", rec)
        rows.append(rec)
        del model
    return {"mode": "big", "records": rows}


def _speed_variants(args) -> list[str]:
    out = ["dense"]
    for p in args.patterns:
        out += [f"{p} masked", f"{p} compressed"] + ([f"{p} unpermuted"] if args.unpermuted else [])
    if args.cslt:
        out.append(e2e.CSLT)
    return out


def _prepared(base, variant: str, cache: dict, layout: str = "auto"):
    """The model a variant runs (built once per pattern and kept: the masked and compressed forms of one
    pruning)."""
    import copy

    from vnm_compile.deploy import compress_

    pattern, form = variant.split()
    if form == "unpermuted" and (pattern, form) not in cache:
        cache[(pattern, form)] = copy.deepcopy(base)
        random_sparsify_(cache[(pattern, form)], pattern, permute=False)
    if (pattern, "masked") not in cache:
        masked = copy.deepcopy(base)
        random_sparsify_(masked, pattern)
        cache[(pattern, "masked")] = masked
    if form == "compressed" and (pattern, form) not in cache:
        cache[(pattern, form)] = compress_(copy.deepcopy(cache[(pattern, "masked")]), layout=layout, progress=False)
    return cache[(pattern, form)]


def _kernel_launches(fn, top: int = 0) -> tuple[int, list[dict]]:
    """GPU kernels one call launches (torch.profiler, outside a CUDA graph: what a capture records),
    memcpy and memset included; with ``top``, also the ``top`` kernel names by total GPU time
    ({name, calls, us}: where a step's time goes)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in events:
        by_name.setdefault(e.name[:120], []).append(e.device_time if hasattr(e, "device_time") else e.cuda_time)
    table = [{"name": n, "calls": len(t), "us": round(sum(t), 2)} for n, t in by_name.items()]
    table.sort(key=lambda r: -r["us"])
    return len(events), table[:top]


@torch_no_grad_decorator
def run_speed(args) -> dict:
    import torch

    base = e2e.build_llama(args)
    cases = [("decode", b, e2e.llama_decode) for b in args.decode_batches]
    if args.prefill:  # second: the first decode case, then prefill, then the other batches (budget order)
        cases.insert(min(1, len(cases)), ("prefill", 1, e2e.llama_prefill))
    log.warning("no materialized attention masks where none is needed: %s", e2e.skip_unneeded_masks())
    cache: dict = {}
    records = []
    for phase, batch, make in cases:
        call, tokens = make(args, base, batch)
        for variant in _speed_variants(args):
            rec = {"phase": phase, "batch": batch, "tokens": tokens, "variant": variant}
            if time.perf_counter() - args.t0 > args.budget_s:
                records.append(e2e._skipped(rec, "time budget"))
                continue
            e2e._cleanup()
            if variant == "dense":
                compiled = torch.compile(base, fullgraph=True, dynamic=False)
            elif variant == e2e.CSLT:
                try:
                    cslt, _ = e2e._cslt_model(base, tokens)
                except RuntimeError as err:  # e.g. "operation not supported" in its search (H100, torch 2.11+cu130)
                    records.append(e2e._skipped(rec, f"cuSPARSELt failed: {str(err).splitlines()[0][:80]}"))
                    continue
                compiled = torch.compile(cslt, fullgraph=True, dynamic=False)
            elif variant.endswith("masked"):
                compiled = torch.compile(
                    _prepared(base, variant, cache, args.layout), backend="vnm", fullgraph=True, dynamic=False
                )
            else:  # the README's recipe: the "vnm" backend runs compressed siblings as one launch
                compiled = torch.compile(
                    _prepared(base, variant, cache, args.layout), backend="vnm", fullgraph=True, dynamic=False
                )
            model = getattr(compiled, "_orig_mod", compiled)
            call, _ = make(args, model, batch)
            with torch.no_grad():
                compile_s, ms = e2e._time(lambda compiled=compiled, call=call: call(compiled))
                if getattr(call, "overhead", None) is not None:
                    rec["overhead_ms"] = e2e._time(call.overhead)[1]
                    ms -= rec["overhead_ms"]
            kernels, top = _kernel_launches(lambda compiled=compiled, call=call: call(compiled), args.profile)
            rec.update(ms=ms, compile_s=compile_s, kernels=kernels)
            if top:
                rec["kernel_profile"] = top
            log.warning("%s", rec)
            records.append(rec)
            del compiled
    for rec in records:
        dense = next((r for r in records if r["variant"] == "dense" and r["phase"] == rec["phase"]
                      and r["batch"] == rec["batch"] and "ms" in r), None)  # fmt: skip
        if dense and "ms" in rec:
            rec["speedup"] = dense["ms"] / rec["ms"]
    return {"mode": "speed", "records": records}


def _md(result: dict) -> str:
    lines = [f"# {result['mode']} ({result.get('shapes', 'llama2-7b')} shapes) — {result['gpu']}", "",
             f"Command: `{result['command']}`", "",
             f"Versions: {result['versions']}", "", f"compress_ layout: {result.get('layout', 'auto')}", ""]  # fmt: skip
    recs = result["records"]
    if result["mode"] == "memory":
        lines += ["| pattern | layers | dense GB | masked GB | compressed GB | model ratio | linears ratio | "
                  "cuSPARSELt 2:4 linears ratio | checkpoint GB | load GB/s | host RSS growth MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in recs:
            cslt = "n/a" if r["cslt_linear_ratio"] is None else f"{r['cslt_linear_ratio']:.3f}"
            lines.append(f"| {r['pattern']} | {r['layers']} | {r['dense_bytes'] / 1e9:.2f} | {r['masked_bytes'] / 1e9:.2f} | "
                         f"{r['compressed_bytes'] / 1e9:.2f} | {r['model_ratio']:.3f} | {r['linear_ratio']:.3f} | {cslt} | "
                         f"{r['checkpoint_bytes'] / 1e9:.2f} | {r['load_gb_s']:.2f} | {r['peak_host_rss_growth_mb']:.0f} |")  # fmt: skip
    elif result["mode"] == "big":
        lines += ["| pattern | layers | weights GB | build peak GB | decode peak GB | tokens/s | ms/layer | dense layer ms "
                  "| build s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in recs:
            lines.append(f"| {r['pattern']} | {r['layers']} | {r['weights_bytes'] / 1e9:.1f} | {r['build_peak_bytes'] / 1e9:.1f} | "
                         f"{r['decode_peak_bytes'] / 1e9:.1f} | {r['tokens_per_s']:.1f} | {r['per_layer_ms']:.3f} | "
                         f"{r['dense_layer_ms']:.3f} | {r['build_s']:.0f} |")  # fmt: skip
    else:
        lines += [
            "| phase | batch | tokens | variant | ms | vs dense | GPU kernels per call |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in recs:
            if "ms" not in r:
                lines.append(
                    f"| {r['phase']} | {r['batch']} | {r['tokens']} | {r['variant']} | skipped: {r.get('skipped')} | | |"
                )
                continue
            lines.append(f"| {r['phase']} | {r['batch']} | {r['tokens']} | {r['variant']} | {r['ms']:.3f} | "
                         f"{r.get('speedup', float('nan')):.2f}x | {r.get('kernels', '')} |")  # fmt: skip
        for r in (r for r in recs if r.get("kernel_profile")):
            lines += ["", f"### {r['phase']} {r['tokens']} tokens, {r['variant']}: kernels by GPU time (one call, "
                      "outside CUDA graphs)", "", "| kernel | calls | us |", "|---|---:|---:|"]  # fmt: skip
            lines += [f"| `{k['name'][:90]}` | {k['calls']} | {k['us']:.1f} |" for k in r["kernel_profile"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["memory", "speed", "big"])
    parser.add_argument("--cap-gb", type=float, default=80.0, help="big: cap the process's GPU memory (GiB)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (memory: 32, speed: 2)")
    parser.add_argument(
        "--shapes", choices=sorted(e2e.LLAMA_SHAPES), default="llama2-7b", help="memory/speed: the model"
    )
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS))
    parser.add_argument("--kv-len", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--decode-batches", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--no-cslt", dest="cslt", action="store_false")
    parser.add_argument(
        "--unpermuted", action="store_true", help="speed: also the masked form pruned without permutations"
    )
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="K",
        help="speed: record each variant's K kernels with the most GPU time (one profiled call)",
    )
    parser.add_argument("--tmp", default=None, help="folder for the checkpoint (default: the system's temp)")
    parser.add_argument("--layout", default="auto", choices=["auto", "tc", "tc-compact", "rows"],
                        help="compress_'s layout (tc-compact: the sparse-tensor-core records without the dense "
                        "GEMM's rows; results are written as deploy_<mode>_<layout>.*)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    args.t0 = time.perf_counter()
    import torch

    import vnm_compile  # noqa: F401
    from vnm_compile.kernels.benchmark import command_line, environment, save_results, versions
    from vnm_compile.kernels.dispatch import gpu_slug, results_dir

    if not torch.cuda.is_available():
        print("bench_deploy needs a CUDA GPU", file=sys.stderr)
        return 1
    args.device, args.dtype, args.smoke = "cuda", torch.float16, False
    args.layers = args.layers or {"memory": 32, "speed": 2, "big": 80}[args.mode]
    args.llama_layers = args.layers
    env = environment(args.device, args.dtype)  # the commit when the run starts (it takes minutes)
    result = {"memory": run_memory, "speed": run_speed, "big": run_big}[args.mode](args)
    result.update(gpu=torch.cuda.get_device_name(), versions=versions(env), command=command_line("python "),
                  environment=env, shapes="llama2-70b" if args.mode == "big" else args.shapes,
                  wall_s=time.perf_counter() - args.t0, layout=args.layout)  # fmt: skip
    out = args.out or results_dir() / gpu_slug()
    stem = f"deploy_{args.mode}" + ("" if args.shapes == "llama2-7b" or args.mode == "big" else f"_{args.shapes}")
    stem += "" if args.layout == "auto" else f"_{args.layout}"
    save_results(out, stem, result, _md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
