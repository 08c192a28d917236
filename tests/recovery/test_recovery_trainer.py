"""recover_: resume from a checkpoint reproduces an uninterrupted run bit-for-bit; losses, config, errors."""

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, get_sparsity, is_vnm, sparsify_
from vnm_compile.recovery import DistillLoss, RecoveryConfig, masked_mse, recover_
from vnm_compile.recovery.trainer import CHECKPOINT_NAME

PATTERN = "8:2:5"


def tiny(seed: int = 0, sparse: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(21, 33), nn.GELU(), nn.Dropout(0.2), nn.Linear(33, 27), nn.GELU(), nn.Linear(27, 7))
    if sparse:
        sparsify_(model, VNMConfig(PATTERN, score="abs", permute=False, min_numel=0), progress=False)
    return model


class Interrupt(Exception):
    pass


def data(n: int = 5, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(12, 21, generator=g) for _ in range(n)]


METHOD_KW = {
    "fixed": {},
    "srste": {"srste_interval": 3, "srste_lambda": 1e-2},
    "three_stage": {"stage_fractions": (0.2, 0.3, 0.5), "stage2_interval": 2, "score": "abs", "lora_rank": 3},
}


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_resume_reproduces_uninterrupted_run_bit_for_bit(method, tmp_path):
    kw = dict(method=method, steps=10, lr=1e-2, seed=7, checkpoint_every=4, **METHOD_KW[method])
    teacher = tiny(1, sparse=False)

    full = tiny()
    res_full = recover_(full, data(), teacher=teacher, checkpoint_dir=tmp_path / "a", progress=False, **kw)

    def stop_after_8(_model):
        if stop_after_8.calls == 1:  # eval_every=4: called after steps 4 and 8; checkpoint of step 8 is written
            raise Interrupt
        stop_after_8.calls += 1
        return 0.0

    stop_after_8.calls = 0
    part = tiny()
    with pytest.raises(Interrupt):
        recover_(part, data(), teacher=teacher, checkpoint_dir=tmp_path / "b", eval_fn=stop_after_8, eval_every=4,
                 progress=False, **kw)  # fmt: skip
    assert (tmp_path / "b" / CHECKPOINT_NAME).exists()
    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG at call time
    resumed = tiny()
    res = recover_(resumed, data(), teacher=teacher, checkpoint_dir=tmp_path / "b", progress=False, **kw)
    assert res.resumed_from == 8
    assert [h["loss"] for h in res.history] == [h["loss"] for h in res_full.history]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    for la, lb in zip(full, resumed, strict=True):
        if isinstance(la, nn.Linear):
            assert torch.equal(get_sparsity(la).mask, get_sparsity(lb).mask)


def test_checkpoint_of_other_run_is_rejected(tmp_path):
    recover_(
        tiny(), data(), teacher=tiny(1, False), steps=4, checkpoint_every=2, checkpoint_dir=tmp_path, progress=False
    )
    with pytest.raises(ValueError, match="method"):
        recover_(tiny(), data(), teacher=tiny(1, False), method="srste", steps=4, checkpoint_dir=tmp_path,
                 progress=False)  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_distillation_reduces_loss_and_leaves_vnm_weights(method):
    teacher = tiny(0, sparse=False)  # the dense version of the student
    model = tiny(0)
    res = recover_(model, data(8), RecoveryConfig(method=method, steps=40, lr=3e-3, train_mode=False,
                                                   **METHOD_KW[method]), teacher=teacher, progress=False)  # fmt: skip
    start = 8 if method == "three_stage" else 0  # three-stage: stage 1 is the dense teacher itself (loss 0)
    first, last = res.history[start]["loss"], sum(h["loss"] for h in res.history[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for lin in (model[0], model[3], model[5]):
        state = get_sparsity(lin.weight)
        assert type(lin.weight) is nn.Parameter and is_vnm(lin.weight != 0, state.pattern)
        assert (lin.weight[~state.mask] == 0).all()


def test_eval_hook_and_history():
    calls = []
    res = recover_(tiny(), data(), teacher=tiny(1, False), steps=6, eval_every=2, warmup=0.5, lr=0.1, progress=False,
                   eval_fn=lambda m: calls.append(m.training) or {"score": 1.0})  # fmt: skip
    assert calls == [False] * 4  # steps 2, 4, 6 and after the merge, always in eval mode
    assert [e["step"] for e in res.evals] == [2, 4, 6, 6] and res.evals[-1]["merged"]
    assert [h["step"] for h in res.history] == list(range(1, 7))
    # 3 warmup steps, then cosine decay to 0 over the remaining 3
    torch.testing.assert_close([h["lr"] for h in res.history], [0.1 / 3, 0.2 / 3, 0.1, 0.1, 0.075, 0.025])


def test_task_loss_callable_and_tuple_batches():
    model = tiny()
    batches = [(torch.randn(10, 21), torch.randn(10, 7)) for _ in range(3)]

    def task_loss(m, batch):
        x, y = batch
        return nn.functional.mse_loss(m(x), y)

    res = recover_(model, batches, loss=task_loss, steps=3, progress=False)
    assert len(res.history) == 3


def test_masked_mse_ignores_padding():
    s, t = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    att = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ref = torch.cat([(s[0, :3] - t[0, :3]).reshape(-1), (s[1] - t[1]).reshape(-1)]).square().mean()
    torch.testing.assert_close(masked_mse(s, t, att), ref.float())


def test_distill_loss_cache_reuses_teacher_outputs():
    calls = []
    teacher = tiny(1, False)
    teacher.register_forward_hook(lambda *_: calls.append(1))
    loss = DistillLoss(teacher, cache=True)
    batch = torch.randn(4, 21)
    first = loss(tiny(), batch)
    second = loss(tiny(), batch.clone())
    assert len(calls) == 1 and torch.equal(first, second)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "lora"}, "method"),
        ({"steps": 0}, "steps"),
        ({"score": "l2"}, "score"),
        ({"stage_fractions": (0.5, 0.6, 0.1), "method": "three_stage"}, "fractions"),
        ({"warmup": 1.0}, "warmup"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecoveryConfig(**kwargs)


def test_errors():
    with pytest.raises(ValueError, match="sparsify_"):
        recover_(tiny(sparse=False), data(), teacher=tiny(1, False), progress=False)
    with pytest.raises(ValueError, match="teacher"):
        recover_(tiny(), data(), progress=False)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        recover_(tiny(), data(), teacher=tiny(1, False), checkpoint_every=2, progress=False)


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_merged_model_lowers_with_vnm_backend(method):
    import vnm_compile.backend as backend

    model = tiny(0)
    recover_(model, data(), method=method, steps=5, lr=1e-2, teacher=tiny(0, sparse=False), train_mode=False,
             progress=False, **METHOD_KW[method])  # fmt: skip
    model.eval()
    x = torch.randn(9, 21)
    with torch.no_grad():
        expected = model(x)
        torch._dynamo.reset()
        backend.clear_reports()
        got = torch.compile(model, backend="vnm", options={"inductor": False, "force_sparse": True})(x)
    report = backend.last_report()
    assert len(report.lowered) == 3, report.table()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", sorted(METHOD_KW))
def test_gpt2_conv1d_layers_recover_from_a_dense_conv1d_teacher(method):
    transformers = pytest.importorskip("transformers")
    from vnm_compile.recovery.trainer import _copy_dense_weights

    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=50, use_cache=False)
    torch.manual_seed(0)
    teacher = transformers.GPT2LMHeadModel(cfg).eval()
    model = transformers.GPT2LMHeadModel(cfg)
    model.load_state_dict(teacher.state_dict())
    sparsify_(model, VNMConfig("16:2:5", score="abs", min_numel=0), progress=False)
    assert _copy_dense_weights(model, teacher) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj: transposed
    torch.testing.assert_close(
        model.transformer.h[0].attn.c_attn.weight, teacher.transformer.h[0].attn.c_attn.weight.t()
    )
    ids = [torch.randint(0, 50, (2, 8)) for _ in range(3)]

    def loss(m, batch):  # a task loss (the distillation losses read hidden states from dict batches)
        return nn.functional.cross_entropy(m(batch).logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())

    recover_(
        model, ids, teacher=teacher, loss=loss, method=method, steps=4, lr=1e-3, progress=False, **METHOD_KW[method]
    )
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        module = model.transformer.h[0].get_submodule(name)
        state = get_sparsity(module)
        assert is_vnm(state.mask, "16:2:5", state.in_perm, state.out_perm)
        assert not module.weight.masked_fill(state.mask, 0).any()  # merged: zeros off the mask
