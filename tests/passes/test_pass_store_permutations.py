"""store_out_permutations: in a decode-only graph, each permuted layer's output index op goes into the
kernels' store (vnm::compressed_linear's row_index), siblings fused with it; prefill graphs and dynamic
graphs keep their index ops. Compiled == eager throughout (masked and compressed forms, tiny Llama and BERT
from transformers configs, random permutations from calibration). Unpermuted layers on a GPU with the sparse
tensor cores (simulated on the CPU) run the op with their own weight held for its dense path.
"""

import copy

import pytest
import torch

from vnm_compile import VNMConfig, calibrate, compress_, sparsify_
from vnm_compile.kernels.compressed import OP as COMPRESSED_OP
from vnm_compile.kernels.compressed import row_index
from vnm_compile.passes.lower_linears import LAYER_META, PERM_META

transformers = pytest.importorskip("transformers")

from test_joint_permutations import Recorder  # noqa: E402  (tests/ is on sys.path under pytest)

INDEX = (torch.index_select, torch.ops.aten.index_select.default)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return transformers.LlamaModel(cfg).eval()


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _sparsified(build):
    model = build()
    stats = calibrate(model, [torch.randint(0, 96, (2, 11)) for _ in range(2)], progress=False)
    sparsify_(model, VNMConfig("16:2:8", min_numel=0), stats, progress=False)
    return model


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is COMPRESSED_OP]


def _run(model, ids, **options):
    rec = Recorder(**options)
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids).last_hidden_state
        ref = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    return rec


@pytest.mark.parametrize("build", [_llama, _bert], ids=["llama", "bert"])
def test_decode_graph_stores_the_output_permutations(build):
    model = _sparsified(build)
    rec = _run(model, torch.randint(0, 96, (4, 1)))  # 4 tokens: a decode step of 4 sequences
    gm, report = rec.graphs[-1], rec.reports[-1]
    out_index = [n for n in gm.graph.nodes if n.target in INDEX and (n.meta.get(PERM_META) or ("",))[0] == "out"]
    assert not out_index, gm.code
    calls = _calls(gm)
    weights = {c: [getattr(gm, w.target) for w in c.args[1]] for c in calls}
    permuted = {r.name: r for r in report.lowered if r.permuted}
    stored = {name for name, r in permuted.items() if "out: in the kernel's store" in r.permutations}
    assert stored and not any("out: index op" in r.permutations for r in permuted.values())
    for call in calls:  # the CPU layout (values, columns, meta), and a row_index where the layers' outputs move
        names = set(call.meta[LAYER_META].split("+"))
        has_rows = row_index(weights[call], call.args[2]) is not None
        assert has_rows or not names & stored, names  # (a fused call may carry identity rows for a sibling)
    # q/k/v and gate/up still fuse (their row indices shifted to each member's slice): fewer calls than layers
    assert len(calls) < len(permuted)


def test_prefill_and_dynamic_graphs_keep_the_index_ops():
    model = _sparsified(_llama)
    rec = _run(model, torch.randint(0, 96, (3, 12)))  # 36 tokens: above the decode range
    gm, report = rec.graphs[-1], rec.reports[-1]
    assert any(n.target in INDEX and (n.meta.get(PERM_META) or ("",))[0] == "out" for n in gm.graph.nodes)
    weights = [[getattr(gm, w.target) for w in c.args[1]] for c in _calls(gm)]
    assert not any(row_index(w, c.args[2]) is not None for w, c in zip(weights, _calls(gm), strict=True))
    assert not any("kernel's store" in r.permutations for r in report.lowered)
    torch._dynamo.reset()
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=True)
    with torch.no_grad():
        ids = torch.randint(0, 96, (2, 3))
        torch.testing.assert_close(
            compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4
        )
    assert not any("kernel's store" in r.permutations for r in rec.reports[-1].lowered)


def test_compressed_model_decode_graph_drops_the_output_index_ops():
    model = _sparsified(_llama)
    compressed = compress_(copy.deepcopy(model), progress=False)
    ids = torch.randint(0, 96, (2, 1))
    rec = Recorder()
    compiled = torch.compile(compressed, backend=rec, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got, model(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, compressed(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)
    gm = rec.graphs[-1]
    calls = _calls(gm)
    # every call's output is read as it is (split into siblings at most), never through an index op
    for call in calls:
        users = [u for v in call.users for u in ([v] if v.target is not torch.split else v.users)]
        assert not any(u.target in INDEX or (u.op == "call_method" and u.target == "index_select") for u in users)


@pytest.mark.gpu
@pytest.mark.parametrize("permute", [True, False], ids=["permuted", "unpermuted"])
@pytest.mark.parametrize("tokens", [1, 16, 48])
def test_gpu_decode_graph_runs_compressed_linear(permute, tokens):
    """On a GPU with the sparse tensor cores: every sparsified layer runs vnm::compressed_linear (permuted ones
    with their output permutations in the kernels' store at decode, unpermuted ones with their own weight
    held for the dense path, instead of the shipped table's prediction), and matches eager with the real
    kernels (48 tokens: the measured choice between the sparse GEMM and cuBLAS, which may keep a layer dense on
    its own masked weight: an H100 did for every layer of this small model)."""
    from vnm_compile.kernels.sparse_tc import sparse_tc_available

    if not torch.cuda.is_available() or not sparse_tc_available():
        pytest.skip("needs a CUDA GPU with the sparse tensor cores")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaModel(cfg).cuda().half().eval()
    batches = [torch.randint(0, 96, (2, 11), device="cuda") for _ in range(2)]
    stats = calibrate(model, batches, progress=False)
    sparsify_(model, VNMConfig("64:2:8", min_numel=0, permute=permute), stats, progress=False)
    rec = Recorder(inductor=True, force_sparse=False)
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    ids = torch.randint(0, 96, (tokens, 1), device="cuda")
    with torch.no_grad():
        got = compiled(input_ids=ids, use_cache=False).last_hidden_state
        ref = model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    report = rec.reports[-1]
    # at 48 tokens a layer may stay dense on its own masked weight where this GPU measured no sparse win
    dense = [r for r in report.layers if not r.lowered and "runs dense at 48 tokens" in (r.reason or "")]
    assert len(report.lowered) + (len(dense) if tokens == 48 else 0) == 14
    assert all(r.mode.startswith("compressed") for r in report.lowered)
    if permute and tokens <= 32:
        assert any("out: in the kernel's store" in r.permutations for r in report.lowered)
    if not permute:
        assert all("dense on its own weight" in r.mode for r in report.lowered)


@pytest.mark.parametrize("shape", [(4, 1), (3, 12), "dynamic"])
def test_unpermuted_layers_run_compressed_linear_on_their_own_weight(monkeypatch, shape):
    """On a GPU with the sparse tensor cores (simulated: the CPU runs the row-major reference), an unpermuted
    sparsified layer runs vnm::compressed_linear with its own masked weight held for the dense path (no copy:
    the graph's weight input), at decode, prefill and in a dynamic graph; q/k/v and gate/up fuse with their
    weights listed; compiled == eager."""
    import importlib

    F = importlib.import_module("vnm_compile.passes.find_linears")
    monkeypatch.setattr(F, "_sparse_tc_gpu", lambda device: True)
    monkeypatch.setattr(F, "_tc_eligible", lambda site, pattern: True)  # fp32 on the CPU: not a kernel dtype
    model = _llama()
    stats = calibrate(model, [torch.randint(0, 96, (2, 11)) for _ in range(2)], progress=False)
    sparsify_(model, VNMConfig("16:2:8", min_numel=0, permute=False), stats, progress=False)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True, dynamic=shape == "dynamic")
    with torch.no_grad():
        for ids in (
            [torch.randint(0, 96, (2, 3)), torch.randint(0, 96, (5, 2))]
            if shape == "dynamic"
            else [torch.randint(0, 96, shape)]
        ):
            got = compiled(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got, model(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
    gm, report = rec.graphs[-1], rec.reports[-1]
    assert len(report.lowered) == 14
    assert all(r.mode == "compressed (dense or sparse per call, dense on its own weight)" for r in report.lowered)
    calls = _calls(gm)
    held = [c.args[4] for c in calls]
    assert all(isinstance(h, list) and h for h in held)
    assert all(d.op == "placeholder" for h in held for d in h)  # the model's own Parameters, not copies
    assert sorted(len(h) for h in held) == [1, 1, 1, 1, 2, 2, 3, 3]  # o, down; gate/up; q/k/v (2 layers)
    assert not any(n.target in INDEX for n in gm.graph.nodes)


def _tc_on_cpu(monkeypatch):
    """The sparse-tensor-core packing on the CPU (the op then runs its plain-PyTorch reference on it)."""
    import importlib

    monkeypatch.setattr(importlib.import_module("vnm_compile.deploy.linear"), "tc_layout_supported", lambda *a: True)


def _fp16_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = transformers.LlamaModel(cfg).half().eval()
    stats = calibrate(model, [torch.randint(0, 96, (2, 11)) for _ in range(2)], progress=False)
    sparsify_(model, VNMConfig("64:2:8", min_numel=0), stats, progress=False)
    return model


@pytest.mark.parametrize("form", ["sparsified", "compressed"])
@pytest.mark.parametrize("tokens", [1, 4, 8])
def test_few_token_graph_folds_the_input_permutations_into_the_columns(monkeypatch, form, tokens):
    """In a graph whose every call is at most FOLD_TOKENS (4) tokens, each permuted layer's input index op
    goes into the sparse-TC packing's columns (LAYOUT_TC_FOLDED: absolute input features), siblings fused
    first; at more tokens the index op stays. The function is unchanged (compiled == eager, fp16, random permutations from
    the real search) and the report says where each input permutation went."""
    from vnm_compile.kernels.compressed import LAYOUT_TC_FOLDED, read_spec
    from vnm_compile.passes.store_permutations import FOLD_TOKENS

    _tc_on_cpu(monkeypatch)
    model = _fp16_llama()
    if form == "compressed":
        model = compress_(model, progress=False)
    ids = torch.randint(0, 96, (tokens, 1))
    rec = Recorder()
    compiled = torch.compile(model, backend=rec, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # outputs poisoned between runs: the second call must write every element again
            got = compiled(input_ids=ids).last_hidden_state.float()
            torch.testing.assert_close(got, model(input_ids=ids).last_hidden_state.float(), rtol=2e-3, atol=2e-3)
    gm, report = rec.graphs[-1], rec.reports[-1]
    calls = _calls(gm)
    # calls reading x through an index op (the sparsified form's own, or the one VNMLinear's forward traced)
    fed = [c for c in calls if c.args[0].target in INDEX or c.args[0].target == "index_select"]
    layouts = [read_spec([_tensor(gm, w) for w in c.args[1]], c.args[2]).layout for c in calls]
    assert len(calls) == 8  # q/k/v and gate/up one launch each, folded or not
    # the compile report has a line per layer for the sparsified form (a compressed model's VNMLinear calls
    # are counted only)
    permuted = [r for r in report.lowered if r.permuted]
    assert len(permuted) == (14 if form == "sparsified" else 0)
    if tokens <= FOLD_TOKENS:
        assert not fed, gm.code
        assert all(layout == LAYOUT_TC_FOLDED for layout in layouts)
        assert all("in: in the kernel's columns" in r.permutations for r in permuted)
    else:
        assert len(fed) == 8 and LAYOUT_TC_FOLDED not in layouts
        assert not any("kernel's columns" in r.permutations for r in permuted)


def _tensor(gm, node):
    """The tensor a get_attr node reads, or the example value of a placeholder (a compressed model's buffer)."""
    return getattr(gm, node.target) if node.op == "get_attr" else node.meta["example_value"]


def test_folded_columns_are_the_permuted_features():
    """perm[columns] over the whole unsigned 16-bit range the packing stores as int16."""
    from vnm_compile.passes.store_permutations import folded_columns

    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(60000, generator=gen)
    local = torch.randint(0, 60000, (2, 3, 32), generator=gen)
    stored = torch.where(local >= 1 << 15, local - (1 << 16), local).to(torch.int16)
    got = folded_columns(stored, perm)
    assert got.dtype == torch.int16 and got.shape == local.shape
    assert torch.equal(got.to(torch.int64) & 0xFFFF, perm[local])
