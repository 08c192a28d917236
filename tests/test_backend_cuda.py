"""The "vnm" backend on a CUDA GPU with the Triton kernels: fp16, inductor, fullgraph.
Skipped without a GPU (CI has none); run on the GPU machine."""

import copy

import pytest
import torch

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.backend import clear_reports, reports
from vnm_compile.kernels.vnm_linear import OP

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    import vnm_compile.kernels as kernels
    from vnm_compile.kernels import dispatch

    # These tests check the Triton path's numbers: lower every eligible layer to vnm::linear,
    # whatever the measured speed table says about these small shapes.
    monkeypatch.setattr(kernels, "prefer_sparse", lambda *args, **kwargs: True)
    monkeypatch.setattr(dispatch, "sparse_token_limit", lambda *args, **kwargs: None)
    torch._dynamo.reset()
    clear_reports()


def eager_abs(model, pattern, **cfg):
    ref = copy.deepcopy(model)
    sparsify_(ref, VNMConfig(pattern, score="abs", permute=False, **cfg), progress=False)
    return ref


def assert_three_way(got, eager, exact, dtype):
    """The compiled (Triton, fp32 accumulation) error vs float64 is within twice the eager fp16
    (cuBLAS, fp32 accumulation) error plus one output rounding: same precision, other summation order."""
    eps = torch.finfo(dtype).eps
    err_c = (got.double() - exact).abs().max().item()
    err_e = (eager.double() - exact).abs().max().item()
    assert err_c <= 2 * err_e + eps * exact.abs().max().item(), (err_c, err_e)


class Block(torch.nn.Module):
    def __init__(self, d=256, f=688):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.fc1 = torch.nn.Linear(d, f)
        self.fc2 = torch.nn.Linear(f, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.silu(self.fc1(self.norm(x))))


@pytest.mark.parametrize("pattern", ["64:2:8", "64:2:5", "2:4"])
def test_block_fp16_inductor_matches_eager_sparsified(pattern):
    torch.manual_seed(0)
    model = Block().cuda().half().eval()
    ref = eager_abs(model, pattern, ignore=(), min_numel=0)
    compiled = torch.compile(model, backend="vnm", options={"pattern": pattern, "min_numel": 0, "ignore": []})
    with torch.no_grad():
        for tokens in (1, 7, 300):  # decode-sized and prefill-sized inputs
            x = torch.randn(2, tokens, 256, device="cuda", dtype=torch.half)
            got, eager, exact = compiled(x), ref(x), ref.double()(x.double())
            ref.half()
            assert_three_way(got, eager, exact, torch.half)
    assert all(len(r.lowered) == 2 for r in reports())


@pytest.mark.parametrize("extra", [{"interleave_rows": True}, {"interleave_rows": True, "expand_weights": True}])
def test_block_fp16_with_held_layouts(extra):
    """The options that hold more tensors (row-interleaved copies, expanded weights) compute the same
    function through whichever kernel each token count picks."""
    torch.manual_seed(1)
    model = Block().cuda().half().eval()
    ref = eager_abs(model, "64:2:8", ignore=(), min_numel=0)
    options = {"pattern": "64:2:8", "min_numel": 0, "ignore": [], **extra}
    compiled = torch.compile(model, backend="vnm", options=options)
    with torch.no_grad():
        for tokens in (1, 3, 16, 300):
            x = torch.randn(1, tokens, 256, device="cuda", dtype=torch.half)
            got, eager, exact = compiled(x), ref(x), ref.double()(x.double())
            ref.half()
            assert_three_way(got, eager, exact, torch.half)
    assert all(", interleaved" in r.mode for r in reports()[-1].lowered)  # (then ", sparse TC ..." where they win)


def test_tiny_llama_fp16_fullgraph_inductor_prefill_and_decode():
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).cuda().half().eval()
    ref = eager_abs(model, "64:2:5")
    graphs = []

    def backend(gm, example_inputs):
        from vnm_compile.backend import vnm_backend

        fn = vnm_backend(gm, example_inputs, options={"pattern": "64:2:5"})
        graphs.append(gm)
        return fn

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    caches = [StaticCache(config=cfg, max_cache_len=64) for _ in range(3)]
    with torch.no_grad():
        ids = torch.randint(0, 256, (2, 11), device="cuda")
        pos = torch.arange(11, device="cuda")
        for _step in range(3):
            kw = {"cache_position": pos, "use_cache": True}
            got = compiled(input_ids=ids, past_key_values=caches[0], **kw).logits
            eager = ref(input_ids=ids, past_key_values=caches[1], **kw).logits
            exact = ref.double()(input_ids=ids, past_key_values=caches[2], **kw).logits
            ref.half()
            assert_three_way(got, eager, exact, torch.half)
            ids, pos = eager[:, -1:].argmax(-1), pos[-1:] + 1
    # 7 linears a layer; k/v (128 x 256 = 32768) are above min_numel: all lowered, lm_head ignored
    assert len(reports()[-1].lowered) == 14
    # q/k/v and gate/up share a launch (fuse_siblings): 4 vnm.linear calls a layer
    assert sum(n.target is OP for n in graphs[-1].graph.nodes) == 8


def test_tiny_deit_fp16_fullgraph_no_inductor():
    from transformers import DeiTConfig, DeiTModel

    torch.manual_seed(0)
    cfg = DeiTConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, image_size=64, patch_size=16
    )
    model = DeiTModel(cfg).cuda().half().eval()
    ref = eager_abs(model, "64:2:8")
    compiled = torch.compile(model, backend="vnm", options={"pattern": "64:2:8", "inductor": False}, fullgraph=True)
    with torch.no_grad():
        for batch in (3, 8):
            x = torch.randn(batch, 3, 64, 64, device="cuda", dtype=torch.half)
            got = compiled(pixel_values=x).last_hidden_state
            eager = ref(pixel_values=x).last_hidden_state
            exact = ref.double()(pixel_values=x.double()).last_hidden_state
            ref.half()
            assert_three_way(got, eager, exact, torch.half)
    assert all(len(r.lowered) == 2 * 6 + 1 for r in reports())  # 6 linears a layer + pooler


@pytest.mark.parametrize("tc", [False, 1])
def test_minilm_shaped_bert_fp16_dynamic_lengths(tc):
    """all-MiniLM-L6-v2's layer shapes (hidden 384, 12 heads, MLP 1536; 2 of its 6 layers, random
    weights: the real ones are a CPU test), fp16, inductor, dynamic sequence lengths: one graph for
    every length, every linear lowered, within fp16 rounding of the eager pruned model; with
    sparse_tensor_cores=1 every layer runs the mma.sp/wgmma.sp kernels (decode kernel at 14 tokens,
    the GEMM at 66 and 300)."""
    from transformers import BertConfig, BertModel

    from vnm_compile.kernels.sparse_tc import sparse_tc_available

    if tc and not sparse_tc_available():
        pytest.skip("the sparse tensor cores need compute capability >= 8.0")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536
    )
    model = BertModel(cfg, add_pooling_layer=False).cuda().half().eval()
    ref = eager_abs(model, "64:2:8", ignore=(), min_numel=0)
    options = {"pattern": "64:2:8", "ignore": [], "min_numel": 0, "sparse_tensor_cores": tc}
    compiled = torch.compile(model, backend="vnm", options=options, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for length in (7, 33, 150):
            ids = torch.randint(0, 1000, (2, length), device="cuda")
            mask = torch.ones_like(ids)
            mask[1, length // 2 :] = 0  # a padded second sequence
            got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            eager = ref(input_ids=ids, attention_mask=mask).last_hidden_state
            exact = ref.double()(input_ids=ids, attention_mask=mask).last_hidden_state
            ref.half()
            assert_three_way(got, eager, exact, torch.half)
    assert len(reports()) == 1  # no recompile per length
    lowered = reports()[-1].lowered
    assert len(lowered) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all(("sparse TC from 1 tokens" in r.mode) == bool(tc) for r in lowered)
