import pytest
import torch
from torch import nn

from vnm_compile.calibration.hessian import HessianObserver
from vnm_compile.calibration.sequential import capture_block_inputs, find_blocks, run_layerwise


class Block(nn.Module):
    """q/k/v read one tensor, o reads their product, up -> down (an MLP), kwargs like a transformer layer."""

    def __init__(self, d: int = 24, f: int = 40):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, h, scale=None, past_key_values=None, use_cache=True):
        x = h * scale
        a = self.o(torch.tanh(self.q(x) * self.k(x)) + self.v(x))
        return (h + self.down(torch.relu(self.up(h + a))),)


class Stack(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.embed = nn.Linear(7, 24)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(24, 5)

    def forward(self, x, past_key_values="cache"):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, scale=torch.full((24,), 0.5), past_key_values=past_key_values, use_cache=True)[0]
        return self.head(h)


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5 + i, 7, generator=g) for i in range(n)]


def test_find_blocks_and_capture():
    model = Stack()
    blocks = find_blocks(model)
    assert [n for n, _ in blocks] == ["layers.0", "layers.1", "layers.2"]
    flat = nn.Sequential(nn.Linear(3, 3))
    assert find_blocks(flat) == [("", flat)]  # no ModuleList: the whole model is one block
    batches = _batches()
    calls = capture_block_inputs(model, blocks[0][1], batches)
    assert len(calls) == 3
    torch.testing.assert_close(calls[1].args[0], model.embed(batches[1]))
    assert calls[0].kwargs["past_key_values"] is None and calls[0].kwargs["use_cache"] is False


def _half_pruner(linears, record):
    """A stand-in prune_group: ``record(names, obs)``, then each linear of the group keeps its weights above
    their median magnitude."""

    def prune_group(names, obs: HessianObserver):
        record(names, obs)
        for n in names:
            w = linears[n].weight
            w.mul_((w.abs() > w.abs().median()).to(w.dtype))

    return prune_group


def _record(model, sequential):
    """Run the driver with a prune_group that records H and masks half the weights (a stand-in pruner)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "embed"}
    seen: list[tuple[tuple[str, ...], torch.Tensor, int]] = []

    prune_group = _half_pruner(linears, lambda names, obs: seen.append((names, obs.hessian.clone(), obs.tokens)))

    run_layerwise(model, _batches(), linears, prune_group, sequential=sequential, progress=False)
    return seen


def _inputs_of(model, name, batches):
    x = _acts_of(model, name, batches)
    return x.T @ x


def test_stages_follow_call_order_and_groups():
    torch.manual_seed(0)
    seen = _record(Stack(2), sequential=True)
    names = [s[0] for s in seen]
    assert names == [
        ("layers.0.q", "layers.0.k", "layers.0.v"), ("layers.0.o",), ("layers.0.up",), ("layers.0.down",),
        ("layers.1.q", "layers.1.k", "layers.1.v"), ("layers.1.o",), ("layers.1.up",), ("layers.1.down",),
        ("head",),
    ]  # fmt: skip
    assert all(tokens == 2 * (5 + 6 + 7) for _, _, tokens in seen)


@pytest.mark.parametrize("sequential", [True, False])
def test_each_layer_sees_the_inputs_of_its_mode(sequential):
    """Sequential: every H equals XᵀX of the model pruned so far; dense inputs: of the dense model."""
    torch.manual_seed(0)
    model = Stack(2)
    dense = Stack(2)
    dense.load_state_dict(model.state_dict())
    pruned_copy = Stack(2)
    seen = _record(model, sequential)
    pruned_copy.load_state_dict(model.state_dict())  # the final pruned model
    batches = _batches()
    # The first stage reads dense activations in both modes.
    torch.testing.assert_close(seen[0][1].double(), _inputs_of(dense, "layers.0.q", batches), rtol=1e-5, atol=1e-4)
    # layers.1.up comes after layers.0.* and layers.1.{q,k,v,o} are pruned.
    h_up = dict((s[0][0], s[1]) for s in seen)["layers.1.up"].double()
    ref = _inputs_of(model if sequential else dense, "layers.1.up", batches)  # layers.1.up/down come after it
    torch.testing.assert_close(h_up, ref, rtol=1e-4, atol=1e-3)
    other = _inputs_of(dense if sequential else model, "layers.1.up", batches)
    assert not torch.allclose(h_up, other, rtol=1e-2, atol=1e-2)  # the two modes differ
    h_head = dict((s[0][0], s[1]) for s in seen)["head"].double()
    torch.testing.assert_close(
        h_head, _inputs_of(model if sequential else dense, "head", batches), rtol=1e-4, atol=1e-3
    )


def test_callbacks_around_each_block():
    model = Stack(3)
    events = []
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers")}
    run_layerwise(
        model, _batches(), linears, lambda names, obs: events.append(names[0]), progress=False,
        before_block=lambda i, name, block: events.append(f"before {i} {name}"),
        after_block=lambda i, name, block: events.append(f"after {i} {name}"),
    )  # fmt: skip
    assert events[0] == "before 0 layers.0" and events[5] == "after 0 layers.0"
    assert events[1:5] == ["layers.0.q", "layers.0.o", "layers.0.up", "layers.0.down"]
    assert events[-1] == "after 2 layers.2"


def test_no_batches():
    with pytest.raises(ValueError, match="no calibration batches"):
        run_layerwise(Stack(1), [], {}, lambda *a: None, progress=False)


def _acts_of(model, name, batches):
    got = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for b in batches:
            model(b)
    h.remove()
    return torch.cat(got).double()


def test_dense_target_pairs_the_pruned_and_dense_inputs_of_each_token():
    """Each observer holds the pruned model's inputs (as sequential) and the dense model's for the same
    tokens: H = XᵀX, cross = XᵀX_d, dense = X_dᵀX_d; the head (outside the blocks) gets plain moments."""
    torch.manual_seed(0)
    model = Stack(2)
    dense = Stack(2)
    dense.load_state_dict(model.state_dict())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "embed"}
    seen = {}

    prune_group = _half_pruner(linears, lambda names, obs: seen.__setitem__(names[0], obs))

    run_layerwise(model, _batches(), linears, prune_group, progress=False, dense_target=True)
    batches = _batches()
    for name in ("layers.0.q", "layers.1.up", "layers.1.down"):
        x, xd = _acts_of(model, name, batches), _acts_of(dense, name, batches)
        obs = seen[name]
        for got, ref in ((obs.hessian, x.T @ x), (obs.cross, x.T @ xd), (obs.dense_hessian, xd.T @ xd)):
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(seen["layers.1.up"].cross, seen["layers.1.up"].hessian, rtol=1e-2, atol=1e-2)
    assert seen["head"].cross is None


def test_dense_targets_run_each_block_once_per_batch():
    """With dense targets, a tiny Llama's middle block runs 6 times per batch (4 stages up to their
    leader, one dense pass before pruning, one pruned pass for the next block's inputs; it was 10 with a
    dense pass per stage), and every observer holds exactly the moments of the pruned and the dense
    model's inputs of its leader (float64)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=88, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).double().eval()
    dense = transformers.LlamaModel(cfg).double().eval()
    dense.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 96, (2, 9 + i), generator=g), "use_cache": False} for i in range(3)]
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls = []
    model.layers[1].register_forward_pre_hook(lambda _m, _a: calls.append(1))
    seen = {}

    prune_group = _half_pruner(linears, lambda names, obs: seen.__setitem__(names[0], obs))

    run_layerwise(model, batches, linears, prune_group, progress=False, dense_target=True)
    assert len(calls) == 6 * len(batches) + 1  # + 1: tracing the stages on the first batch
    assert [n for n in seen if n.startswith("layers.1.")] == [
        "layers.1.self_attn.q_proj", "layers.1.self_attn.o_proj", "layers.1.mlp.gate_proj", "layers.1.mlp.down_proj",
    ]  # fmt: skip

    def acts(m, name):
        got = []
        h = m.get_submodule(name).register_forward_pre_hook(lambda _m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for b in batches:
                m(**b)
        h.remove()
        return torch.cat(got)

    for name, obs in seen.items():
        x, xd = acts(model, name), acts(dense, name)
        for got, ref in ((obs.hessian, x.T @ x), (obs.cross, x.T @ xd), (obs.dense_hessian, xd.T @ xd)):
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    assert not torch.allclose(seen["layers.2.mlp.gate_proj"].cross, seen["layers.2.mlp.gate_proj"].hessian)


def test_dense_targets_of_a_model_without_blocks():
    """A model with no ModuleList is one block: its dense pass stops after the last stage's leader, and
    every observer still holds the moments of the pruned and the dense model's inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 24), nn.ReLU(), nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 5), nn.ReLU())
    dense = nn.Sequential(*(nn.Linear(7, 24), nn.ReLU(), nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 5), nn.ReLU()))
    dense.load_state_dict(model.state_dict())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    after_last = []
    model[5].register_forward_pre_hook(lambda _m, _a: after_last.append(1))
    seen = {}

    prune_group = _half_pruner(linears, lambda names, obs: seen.__setitem__(names[0], obs))

    run_layerwise(model, _batches(), linears, prune_group, progress=False, dense_target=True)
    assert list(seen) == ["0", "2", "4"]
    assert len(after_last) == 1  # only the stage trace ran past the last linear
    batches = _batches()
    for name, obs in seen.items():
        x, xd = _acts_of(model, name, batches), _acts_of(dense, name, batches)
        for got, ref in ((obs.hessian, x.T @ x), (obs.cross, x.T @ xd), (obs.dense_hessian, xd.T @ xd)):
            torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(seen["4"].cross, seen["4"].hessian, rtol=1e-2, atol=1e-2)


class ScaledStack(Stack):
    """Changes the hidden states between blocks: replaying the last block's outputs would be wrong."""

    def forward(self, x, past_key_values="cache"):
        h = self.embed(x)
        for layer in self.layers:
            h = 0.5 * layer(h, scale=torch.full((24,), 0.5), past_key_values=past_key_values, use_cache=True)[0]
        return self.head(h)


@pytest.mark.parametrize("cls", [Stack, ScaledStack])
def test_linears_after_the_blocks_calibrate_on_replayed_block_outputs(cls):
    """The head (after the blocks) is calibrated with the blocks replaced by the last block's recorded
    outputs: block 0 no longer runs once per batch for it (only on the first batch, to check the replay);
    a model that changes the hidden states between blocks fails that check and runs in full. Either way the
    head's H is that of the final pruned model."""
    torch.manual_seed(0)
    model = cls(3)
    runs = []
    model.layers[0].register_forward_pre_hook(lambda _m, _a: runs.append(1))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "embed"}
    seen = {}

    prune_group = _half_pruner(linears, lambda names, obs: seen.__setitem__(names[0], obs.hessian.clone()))

    batches = _batches(n=4)
    run_layerwise(model, batches, linears, prune_group, progress=False)
    # per batch: capturing its inputs, 4 stages, its outputs; + the stage trace, the replay check and the
    # head's stage trace; + once per batch for the head where the replay is refused
    replayed = cls is Stack
    assert len(runs) == 6 * 4 + 3 + (0 if replayed else 4)
    assert all(isinstance(b, Block) for b in model.layers)  # the blocks are back
    x = _acts_of(model, "head", batches)
    torch.testing.assert_close(seen["head"].double(), x.T @ x, rtol=1e-5, atol=1e-4)
