"""compress_ / decompress_ / VNMLinear / compressed checkpoints (CPU)."""

import copy
import json
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from vnm_compile import VNMConfig, get_sparsity, sparsify_
from vnm_compile.deploy import (
    VNMLinear,
    compress_,
    compressed_linears,
    decompress_,
    load_compressed,
    memory_report,
    save_compressed,
)
from vnm_compile.deploy.checkpoint import INDEX_NAME

pytest.importorskip("safetensors")


def _mlp(dtype, seed=0, shapes=((97, 131), (131, 67))):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(shapes):
        layers += [nn.Linear(a, b, bias=i % 2 == 0), nn.GELU()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _sparse(dtype, pattern="16:2:5", permute=True, seed=0):
    model = _mlp(dtype, seed)
    sparsify_(model, VNMConfig(pattern, score="abs", permute=permute, min_numel=0), progress=False)
    return model


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("permute", [False, True])
@pytest.mark.parametrize("pattern", ["16:2:5", "64:2:8", "2:4"])
def test_compress_decompress_round_trip_is_exact(dtype, permute, pattern):
    model = _sparse(dtype, pattern, permute)
    weights = {
        n: (m.weight.detach().clone(), get_sparsity(m)) for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    x = torch.randn(4, 3, 97, dtype=torch.float32)
    with torch.no_grad():
        ref = model.float()(x)
    model.to(dtype)
    compress_(model, progress=False)
    assert set(compressed_linears(model)) == set(weights)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert not any(p.numel() >= 67 * 97 for p in model.parameters())  # no dense weight left
    for name, m in compressed_linears(model).items():
        w, state = weights[name]
        assert torch.equal(m.to_dense(), w)  # exactly weight * mask (weights were masked in place)
        assert torch.equal(m.mask(), state.mask)
        assert (m.in_perm is not None) == (state.in_perm is not None)
    with torch.no_grad():
        y = model(x.to(dtype)).float()
    torch.testing.assert_close(y, ref, rtol=TOL[dtype] * 10, atol=TOL[dtype] * 10)
    decompress_(model, progress=False)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            w, state = weights[name]
            assert torch.equal(m.weight, w) and m.weight.dtype == dtype
            back = get_sparsity(m)
            assert back.pattern == state.pattern and torch.equal(back.mask, state.mask)
            for a, b in ((back.in_perm, state.in_perm), (back.out_perm, state.out_perm)):
                assert (a is None and b is None) or torch.equal(a, b)


def test_compressed_is_smaller_than_dense():
    model = nn.Sequential(nn.Linear(1024, 1536, bias=False), nn.ReLU(), nn.Linear(1536, 1024, bias=False)).half()
    sparsify_(model, VNMConfig("64:2:8", score="abs", permute=True), progress=False)
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    compress_(model, progress=False)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # 64:2:8: (2/8)(1 + 1/8) of the dense bytes plus indices and permutations
    assert held < 0.30 * dense, (held, dense)
    assert "0.28" in memory_report(model) or "0.29" in memory_report(model)


def test_compressed_model_runs_eager_inductor_and_vnm_backend():
    model = _sparse(torch.float32)
    x = torch.randn(2, 5, 97)
    with torch.no_grad():
        ref = model(x)
        compress_(model, progress=False)
        eager = model(x)
        torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)
        for backend in ("inductor", "vnm"):
            torch._dynamo.reset()
            out = torch.compile(model, backend=backend)(x)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_inputs_and_bias():
    model = _sparse(torch.float32)
    dense = copy.deepcopy(model)
    compress_(model, progress=False)
    x = torch.randn(3, 97, requires_grad=True)
    xd = x.detach().clone().requires_grad_()
    model(x).square().sum().backward()
    dense(xd).square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[0].bias.grad, dense[0].bias.grad, rtol=1e-4, atol=1e-5)


def test_state_survives_state_dict_pickle_and_deepcopy(tmp_path):
    model = _sparse(torch.float16)
    compress_(model, progress=False)
    x = torch.randn(3, 97, dtype=torch.float16)
    with torch.no_grad():
        ref = model(x)
    # state_dict into a fresh compressed model of another seed, in place and with assign=True
    for assign in (False, True):
        other = _sparse(torch.float16, seed=1)
        compress_(other, progress=False)
        other.load_state_dict(model.state_dict(), assign=assign)
        with torch.no_grad():
            assert torch.equal(other(x), ref)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    clone, pickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for m in (loaded, clone, pickled):
            assert torch.equal(m(x), ref)
            assert isinstance(m[0], VNMLinear)


def test_load_state_dict_rejects_another_pattern():
    model = _sparse(torch.float16, "16:2:5")
    compress_(model, progress=False)
    other = _sparse(torch.float16, "16:2:6")
    compress_(other, progress=False)
    with pytest.raises(RuntimeError, match="16:2:5"):
        other.load_state_dict(model.state_dict())


def test_moving_a_compressed_model_keeps_its_function():
    model = _sparse(torch.float32)
    compress_(model, progress=False)
    x = torch.randn(3, 97)
    with torch.no_grad():
        ref = model(x)
        model.double()
        assert model[0].weight_dtype == torch.float64 and model[0].values.dtype == torch.float64
        torch.testing.assert_close(model(x.double()).float(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float64 weight but got a torch.float32 input"):
        model(x)


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=320, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=2, vocab_size=300)  # fmt: skip
    return transformers, cfg


def _shared_perm_llama(model_class: str):
    """A tiny Llama (``LlamaModel`` or ``LlamaForCausalLM``) pruned at 64:2:8 with q/k/v and gate/up sharing
    one input permutation (one tensor per group)."""
    transformers, cfg = _llama()
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(cfg).eval()
    prefix = "model." if model_class == "LlamaForCausalLM" else ""
    groups = [[f"{prefix}layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(2)]
    groups += [[f"{prefix}layers.{i}.mlp.{p}_proj" for p in ("gate", "up")] for i in range(2)]
    sparsify_(model, VNMConfig("64:2:8", score="abs", permute=True), groups=groups, progress=False)
    return transformers, cfg, model


class _Allocations(TorchDispatchMode):
    """Records the element count of every floating-point tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type != "meta":
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("shard", [1 << 30, 40_000])
def test_save_and_load_into_a_meta_model(tmp_path, shard):
    # q/k/v and gate/up share one input permutation (one tensor: stored once in the checkpoint)
    transformers, cfg, model = _shared_perm_llama("LlamaForCausalLM")
    assert (
        get_sparsity(model.model.layers[0].self_attn.k_proj).in_perm
        is get_sparsity(model.model.layers[0].self_attn.q_proj).in_perm
    )
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        ref = model(ids).logits
    compress_(model, progress=False)
    index = save_compressed(model, tmp_path, max_shard_size=shard)
    meta = json.loads(index.read_text())
    assert meta["metadata"]["format_version"] == 1 and len(meta["metadata"]["vnm_layers"]) == 14
    assert (len(set(meta["weight_map"].values())) > 1) == (shard < 1 << 20)
    with torch.device("meta"):
        fresh = transformers.LlamaForCausalLM(cfg).eval()
    dense_sizes = {m.out_features * m.in_features for m in compressed_linears(model).values()}
    with _Allocations() as seen:
        load_compressed(fresh, tmp_path)
    assert seen.sizes and not dense_sizes & set(seen.sizes)  # no dense weight of a compressed layer, ever
    assert not [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.device.type == "meta"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, ref, rtol=1e-5, atol=1e-5)
    for name, m in compressed_linears(model).items():
        got = fresh.get_submodule(name)
        assert isinstance(got, VNMLinear) and torch.equal(got.to_dense(), m.to_dense())


def _saved(tmp_path):
    model = _sparse(torch.float16)
    compress_(model, progress=False)
    save_compressed(model, tmp_path, max_shard_size=10_000)
    return model


def test_load_rejects_another_architecture_and_changes_nothing(tmp_path):
    _saved(tmp_path)
    wrong = _mlp(torch.float16, shapes=((97, 131), (131, 66)))
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(ValueError, match="'2'.*66x131"):
        load_compressed(wrong, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())
    assert isinstance(wrong[0], nn.Linear)
    with pytest.raises(ValueError, match="missing from the model"):
        load_compressed(nn.Sequential(nn.Linear(97, 131)).half(), tmp_path)


def test_load_rejects_bad_files(tmp_path):
    _saved(tmp_path)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    data = (tmp_path / shard).read_bytes()
    (tmp_path / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_compressed(_mlp(torch.float16), tmp_path)
    (tmp_path / shard).write_bytes(b"\x00" * 8 + data[8:])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_compressed(_mlp(torch.float16), tmp_path)
    (tmp_path / shard).unlink()
    with pytest.raises(ValueError, match="missing"):
        load_compressed(_mlp(torch.float16), tmp_path)
    index["metadata"]["format_version"] = 99
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="version 99"):
        load_compressed(_mlp(torch.float16), tmp_path)
    with pytest.raises(ValueError, match="no model.safetensors.index.json"):
        load_compressed(_mlp(torch.float16), tmp_path / "nowhere")


def test_shard_reader_reads_each_tensor_into_its_own_memory(tmp_path):
    """load_compressed's reader (plain file reads, no memory map) against safetensors, every dtype and odd
    shapes; a shard cut after its header was checked raises."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vnm_compile.deploy.checkpoint import _ShardReader

    gen = torch.Generator().manual_seed(0)
    tensors = {f"{dt}".split(".")[1]: (torch.randn(3, 5, 7, generator=gen) * 100).to(dt)
               for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                          torch.int16, torch.int8, torch.uint8, torch.bool)}  # fmt: skip
    tensors.update(scalar=torch.tensor(3.5, dtype=torch.float16), empty=torch.empty(0, 4, dtype=torch.int16))
    file = tmp_path / "x.safetensors"
    save_file(tensors, file)
    handle = safe_open(str(file), framework="pt", device="cpu")
    reader = _ShardReader(file, handle)
    for key, t in tensors.items():
        got = reader.read(key)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), key
        assert got.untyped_storage().nbytes() == t.numel() * t.element_size()  # its own memory, nothing more
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 10])
    last = max(tensors, key=lambda k: reader.header[k]["data_offsets"][1])
    with pytest.raises(ValueError, match="truncated"):
        reader.read(last)


def test_errors_for_models_without_state():
    with pytest.raises(ValueError, match="no sparsified linears"):
        compress_(_mlp(torch.float32))
    with pytest.raises(ValueError, match="no compressed linears"):
        decompress_(_mlp(torch.float32))
    with pytest.raises(ValueError, match="layout 'tc' is not available"):
        compress_(_sparse(torch.float16), layout="tc")


@pytest.mark.parametrize("pattern", ["64:2:8", "128:2:5"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tc_dense_rebuild_kernel_matches_the_weight(pattern, dtype, monkeypatch):
    """The Triton rebuild of the dense weight from the sparse-tensor-core packing (interpreted on CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from vnm_compile import VNMPattern, VNMWeight, vnm_mask
    from vnm_compile.kernels.sparse_tc import pack_sparse_tc
    from vnm_compile.kernels.tc_dense import tc_to_dense

    p = VNMPattern.parse(pattern)
    torch.manual_seed(0)
    for rows, cols in ((131, 203), (64, 1000)):
        w = torch.randn(rows, cols).to(dtype)
        mask = vnm_mask(w.float().abs(), p)
        packed = pack_sparse_tc(VNMWeight.from_dense(w, mask, p))
        assert torch.equal(tc_to_dense(packed.records, packed.columns, rows, cols, p, dtype), w * mask)


def test_vnm_backend_fuses_compressed_siblings_without_copying():
    """q/k/v and gate/up of a compressed Llama share one storage (share_storage_) and run as one launch each."""
    _, _, model = _shared_perm_llama("LlamaModel")
    ids = torch.randint(0, 300, (2, 5))
    with torch.no_grad():
        ref = model(ids).last_hidden_state
        compress_(model, progress=False)
        attn = model.layers[0].self_attn
        assert attn.q_proj.values.untyped_storage().data_ptr() == attn.v_proj.values.untyped_storage().data_ptr()
        held = sum(t.untyped_storage().nbytes() for t in model.buffers())
        from vnm_compile.backend import last_report

        torch._dynamo.reset()
        out = torch.compile(model, backend="vnm")(ids).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        report = last_report()
        assert (report.compressed_calls, report.compressed_launches) == (14, 8)  # 2 x (q/k/v, o, gate/up, down)
        assert "14 vnm::compressed_linear calls in 8 launches" in report.summary()
        assert sum(t.untyped_storage().nbytes() for t in model.buffers()) == held
        torch._dynamo.reset()
        out = torch.compile(model, backend="vnm", options={"fuse_siblings": False})(ids).last_hidden_state
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert last_report().compressed_launches == 14


def test_sparsify_report_accounts_the_bytes_of_each_form():
    model = nn.Sequential(nn.Linear(1024, 1536, bias=False), nn.ReLU(), nn.Linear(1536, 1000, bias=False)).half()
    report = sparsify_(model, VNMConfig("64:2:8", score="abs"), progress=False)
    for r in report.sparsified:
        assert r.dense_bytes == r.shape[0] * r.shape[1] * 2 and r.mask_bytes >= r.shape[0] * r.shape[1]
    compress_(model, progress=False)
    for r, m in zip(report.sparsified, (model[0], model[2]), strict=True):
        held = m.nbytes - m.vnm_header.numel() * 8 - (0 if m._out_inv is None else m._out_inv.numel() * 8)
        assert r.compressed_bytes == held, (r.name, r.compressed_bytes, held)
    assert "total" in report.memory() and "0.29" in report.memory()


def test_measured_path_choices_are_kept_in_the_user_cache(tmp_path, monkeypatch):
    from vnm_compile.kernels import compressed as C

    file = tmp_path / "gpu" / "paths.json"
    C._disk_choices.cache_clear()
    C._remember(file, "1|torch.float16|4096|4096|64|2|8|256", "dense")
    C._remember(file, "1|torch.float16|4096|4096|64|2|8|512", "sparse")
    C._disk_choices.cache_clear()
    assert C._disk_choices(str(file)) == {
        "1|torch.float16|4096|4096|64|2|8|256": "dense",
        "1|torch.float16|4096|4096|64|2|8|512": "sparse",
    }
    file.write_text("{not json")
    C._disk_choices.cache_clear()
    assert C._disk_choices(str(file)) == {}  # a damaged cache is ignored, not fatal
    C._disk_choices.cache_clear()


@pytest.mark.parametrize("reconstruct", [False, True])
def test_streaming_prune_and_compress_equals_pruning_in_memory(reconstruct):
    """Block by block (each block moved to the device, pruned, compressed) = sparsify_(data=) then compress_."""
    transformers, cfg = _llama()
    from vnm_compile.deploy import sparsify_and_compress_

    config = VNMConfig("64:2:8", score="obs", reconstruct=reconstruct)
    torch.manual_seed(0)
    base = transformers.LlamaModel(cfg).eval()
    batches = [torch.randint(0, 300, (2, 16)) for _ in range(3)]
    streamed, in_memory = copy.deepcopy(base), copy.deepcopy(base)
    report = sparsify_and_compress_(streamed, config, batches, device="cpu", progress=False)
    sparsify_(in_memory, config, data=batches, progress=False)
    compress_(in_memory, progress=False)
    assert len(report.sparsified) == 14 and set(compressed_linears(streamed)) == set(compressed_linears(in_memory))
    for name, m in compressed_linears(in_memory).items():
        assert torch.equal(compressed_linears(streamed)[name].to_dense(), m.to_dense()), name
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        assert torch.equal(streamed(ids).last_hidden_state, in_memory(ids).last_hidden_state)


def test_streaming_with_ria_scores_calibrates_each_block_on_the_pruned_ones():
    transformers, cfg = _llama()
    from vnm_compile import is_vnm
    from vnm_compile.deploy import sparsify_and_compress_

    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval()
    batches = [torch.randint(0, 300, (2, 16)) for _ in range(3)]
    report = sparsify_and_compress_(model, VNMConfig("64:2:5"), batches, device="cpu", progress=False)
    assert len(report.sparsified) == 14 and not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    for m in compressed_linears(model).values():
        p = m.pattern
        assert is_vnm(m.mask(), p, m.in_perm, m.out_perm)
    with torch.no_grad():
        assert model(torch.randint(0, 300, (1, 5))).last_hidden_state.isfinite().all()


def test_prefill_sized_static_graphs_of_masked_models_run_their_own_dense_weight(monkeypatch):
    """A permuted masked layer whose every call has a fixed token count above the decode range runs its own
    masked weight dense unless the table says the sparse tensor cores win there (the compressed path would
    rebuild the dense weight per call)."""
    import sys
    from types import SimpleNamespace

    from vnm_compile.kernels import dispatch
    from vnm_compile.passes import CompileContext, CompileOptions, LinearSite
    from vnm_compile.passes import find_linears as fl_pass  # noqa: F401

    fl = sys.modules["vnm_compile.passes.find_linears"]
    model = _sparse(torch.float16)
    state = get_sparsity(model[0])
    node = SimpleNamespace(args=(SimpleNamespace(meta={"example_value": torch.empty(2, 64, 97)}),), kwargs={})
    monkeypatch.setattr(fl, "_example", lambda x: x.meta["example_value"])
    cuda_weight = SimpleNamespace(device=torch.device("cuda"), shape=(131, 97))
    for floor, dense in ((None, True), (64, False), (256, True)):
        monkeypatch.setattr(dispatch, "sparse_tc_token_floor", lambda *a, floor=floor: floor)
        ctx = CompileContext(CompileOptions(), [])
        site = LinearSite("fc", cuda_weight, [node], state=state)
        fl._dispatch_index(site, ctx)
        assert (site.dense_reason is not None) == dense and site.index_perms == (not dense), floor
    node.args[0].meta["example_value"] = torch.empty(1, 16, 97)  # decode-sized: always the compressed path
    site = LinearSite("fc", cuda_weight, [node], state=state)
    fl._dispatch_index(site, CompileContext(CompileOptions(), []))
    assert site.index_perms and site.dense_reason is None


def test_folded_weight_is_the_module_weight_in_original_order():
    model = _sparse(torch.float16, "16:2:5", permute=True)
    compress_(model, progress=False)
    for m in compressed_linears(model).values():
        assert torch.equal(m.folded_weight().to_dense(), m.to_dense())


def test_tc_compact_layout_converts_through_state_dicts():
    """A "tc-compact" module (packed here on the CPU) loads into "tc", "rows" and "tc-compact" modules and back,
    exactly, and holds fewer bytes than "tc"."""
    model = _sparse(torch.float16, "64:2:5")
    compress_(model, layout="rows", progress=False)
    source = model[0]
    want = source.to_dense()
    tc_bytes = copy.deepcopy(source)
    tc_bytes._to_layout("tc")
    source._to_layout("tc-compact")
    assert source.layout == "tc-compact" and source.nbytes < tc_bytes.nbytes
    assert torch.equal(source.to_dense(), want)
    state = source.state_dict()
    assert int(state["vnm_header"][6]) == 2 and state["tc_records"].shape[-1] == 576
    for layout in ("tc", "rows", "tc-compact"):
        fresh = VNMLinear(97, 131, "64:2:5", dtype=torch.float16, layout=layout, in_permuted=True, out_permuted=True)
        fresh.load_state_dict(copy.deepcopy(state))
        assert fresh.layout == layout and torch.equal(fresh.to_dense(), want), layout
        back = VNMLinear(97, 131, "64:2:5", dtype=torch.float16, layout="tc-compact", in_permuted=True,
                         out_permuted=True)  # fmt: skip
        back.load_state_dict(fresh.state_dict())
        assert torch.equal(back.tc_records, source.tc_records) and torch.equal(back.tc_columns, source.tc_columns)
    with pytest.raises(ValueError, match="layout 'tc-compact' is not available"):
        compress_(_sparse(torch.float16), layout="tc-compact")
