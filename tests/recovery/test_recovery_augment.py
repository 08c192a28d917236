"""AugmentedBatches: special tokens, padding and masks kept, edits as configured, seeded, resumable in recover_."""

import itertools
import math

import pytest
import torch
from torch import nn

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.recovery import AugmentConfig, AugmentedBatches, DistillLoss, recover_

CLS, SEP, PAD = 101, 102, 0
SPECIAL = (PAD, CLS, SEP, 100, 103)  # as BERT's all_special_ids: [PAD], [CLS], [SEP], [UNK], [MASK]


def batch(lengths: list[int], seed: int = 0, vocab: tuple[int, int] = (1000, 1100)) -> dict:
    """A right-padded [CLS] content [SEP] batch with content lengths ``lengths``."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + 2
    ids = torch.full((len(lengths), width), PAD)
    att = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, : n + 2] = torch.cat(
            [torch.tensor([CLS]), torch.randint(*vocab, (n,), generator=g), torch.tensor([SEP])]
        )
        att[r, : n + 2] = 1
    return {"input_ids": ids, "attention_mask": att, "token_type_ids": torch.zeros_like(ids)}


def content(ids: torch.Tensor, att: torch.Tensor) -> list[list[int]]:
    """Each row's tokens between [CLS] and [SEP], checking the frame (CLS first, SEP last, padding after)."""
    rows = []
    for row, mask in zip(ids.tolist(), att.tolist(), strict=True):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)  # right-padded, no gaps
        assert row[0] == CLS and row[n - 1] == SEP and all(t == PAD for t in row[n:])
        middle = row[1 : n - 1]
        assert not set(middle) & set(SPECIAL)  # no special token inside, none replaced away
        rows.append(middle)
    return rows


def contiguous_in(part: list[int], whole: list[int]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


def mixed_from(new: list[int], old: list[int], rows: list[list[int]], least: int) -> bool:
    """``new`` is a window of ``old`` (at least ``least`` long) with a window of one of ``rows`` before or
    after it, and no longer than ``old``."""

    def window(part: list[int], of: list[list[int]]) -> bool:
        return not part or any(contiguous_in(part, r) for r in of)

    splits = ((new[:k], new[k:]) for k in range(len(new) + 1))
    return len(new) <= len(old) and any(
        (len(a) >= least and window(a, [old]) and window(b, rows))
        or (len(b) >= least and window(b, [old]) and window(a, rows))
        for a, b in splits
    )


ALL = AugmentConfig(replace=0.15, crop=0.5, mix=0.5)


@pytest.mark.parametrize("config", [AugmentConfig(), AugmentConfig(0.0, crop=1.0), AugmentConfig(0.0, mix=1.0), ALL])
def test_batches_keep_their_frame_and_vocabulary(config):
    src = [batch([5, 30, 17, 1], seed=0), batch([40, 40, 12], seed=1)]
    vocab = set(torch.cat([b["input_ids"].flatten() for b in src]).tolist())
    stream = AugmentedBatches(src, config, special_ids=SPECIAL, pad_id=PAD)
    for b in itertools.islice(stream, 20):
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape[0] in (3, 4)
        # As wide as its longest row, which is no longer than the plain batch's.
        width = b["input_ids"].shape[1]
        assert width == int(b["attention_mask"].sum(1).max()) <= (32 if b["input_ids"].shape[0] == 4 else 42)
        assert set(b["input_ids"].flatten().tolist()) <= vocab and not b["token_type_ids"].any()
        content(b["input_ids"], b["attention_mask"])


def test_replace_changes_only_content_at_the_given_rate():
    src = batch([60] * 8)
    stream = AugmentedBatches([src], AugmentConfig(replace=0.2), special_ids=SPECIAL, pad_id=PAD)
    changed = 0
    for b in itertools.islice(stream, 10):
        assert torch.equal(b["attention_mask"], src["attention_mask"])  # same rows, same places
        diff = b["input_ids"] != src["input_ids"]
        assert not diff[src["attention_mask"] == 0].any() and not diff[:, 0].any()  # padding and [CLS] untouched
        changed += int(diff.sum())
    # 4800 content tokens, 20 % drawn anew, 1 in 100 drawn as the same token: about 950 changed.
    assert 800 < changed < 1100


def test_crop_and_mix_take_contiguous_windows():
    src = [batch([30, 20, 25]), batch([9, 14], seed=1)]
    rows = content(src[0]["input_ids"], src[0]["attention_mask"])
    every = rows + content(src[1]["input_ids"], src[1]["attention_mask"])
    crop = AugmentedBatches([src[0]], AugmentConfig(0.0, crop=1.0, min_crop=0.5), special_ids=SPECIAL, pad_id=PAD)
    shorter = 0
    for b in itertools.islice(crop, 10):
        for new, old in zip(content(b["input_ids"], b["attention_mask"]), rows, strict=True):
            assert math.ceil(0.5 * len(old)) <= len(new) <= len(old) and contiguous_in(new, old)
            shorter += len(new) < len(old)
    assert shorter > 20
    mix = AugmentedBatches(src, AugmentConfig(0.0, mix=1.0, min_crop=0.5), special_ids=SPECIAL, pad_id=PAD)
    foreign = 0
    for b in itertools.islice(mix, 20):
        if b["input_ids"].shape[0] != 3:
            continue
        for new, old in zip(content(b["input_ids"], b["attention_mask"]), rows, strict=True):
            assert mixed_from(new, old, every, least=math.ceil(0.5 * len(old)))
            foreign += not contiguous_in(new, old)
    assert foreign > 15  # most rows hold tokens of another paragraph


def test_seeded_and_different_from_the_input():
    src = [batch([12, 9], seed=s) for s in range(3)]

    def first(n: int, seed: int) -> list[dict]:
        return list(itertools.islice(AugmentedBatches(src, ALL, special_ids=SPECIAL, pad_id=PAD, seed=seed), n))

    a, b, c = first(9, 0), first(9, 0), first(9, 1)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert any(x["input_ids"].shape != y["input_ids"].shape or not torch.equal(x["input_ids"], y["input_ids"])
               for x, y in zip(a, c, strict=True))  # fmt: skip
    originals = {tuple(s["input_ids"].flatten().tolist()) for s in src}
    assert sum(tuple(x["input_ids"].flatten().tolist()) in originals for x in a) <= 1


def test_all_off_visits_every_batch_once_per_epoch():
    src = [batch([3 + s, 5], seed=s) for s in range(4)]
    off = AugmentConfig(replace=0.0)
    got = list(itertools.islice(AugmentedBatches(src, off, special_ids=SPECIAL, pad_id=PAD), 8))
    key = [tuple(b["input_ids"].flatten().tolist()) for b in got]
    assert sorted(key[:4]) == sorted(key[4:]) == sorted(tuple(s["input_ids"].flatten().tolist()) for s in src)
    assert key[:4] != key[4:]  # a fresh order each epoch


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="replace"):
        AugmentConfig(replace=1.5)
    with pytest.raises(ValueError, match="min_crop"):
        AugmentConfig(min_crop=0.0)
    with pytest.raises(ValueError, match="no batches"):
        AugmentedBatches([], AugmentConfig(), special_ids=SPECIAL, pad_id=PAD)
    with pytest.raises(ValueError, match="input_ids"):
        AugmentedBatches([{"input_ids": torch.ones(2, 3, dtype=torch.long)}], AugmentConfig(), special_ids=(), pad_id=0)
    left = batch([2, 4])
    left["input_ids"][0], left["attention_mask"][0] = left["input_ids"][0].roll(2), left["attention_mask"][0].roll(2)
    with pytest.raises(ValueError, match="right-padded"):
        AugmentedBatches([left], AugmentConfig(), special_ids=SPECIAL, pad_id=PAD)
    two_segments = batch([4, 4])
    two_segments["token_type_ids"][:, 3:] = 1
    with pytest.raises(ValueError, match="single-segment"):
        AugmentedBatches([two_segments], AugmentConfig(), special_ids=SPECIAL, pad_id=PAD)


class TinyEncoder(nn.Module):
    """Embedding, two linears; called as a Hugging Face encoder (``model(**batch)``)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(1200, 24)
        self.fc1, self.fc2 = nn.Linear(24, 40), nn.Linear(40, 16)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.fc2(torch.relu(self.fc1(self.emb(input_ids)))) * attention_mask.unsqueeze(-1)


class Interrupt(Exception):
    pass


def test_recover_resumes_an_augmented_stream_exactly(tmp_path):
    src = [batch([7, 11, 3], seed=s) for s in range(3)]
    teacher = TinyEncoder(1)
    stream = AugmentedBatches(src, ALL, special_ids=SPECIAL, pad_id=PAD, seed=5)
    kw = dict(loss=DistillLoss(teacher), method="fixed", steps=8, lr=1e-2, checkpoint_every=4, progress=False)

    def student() -> TinyEncoder:
        m = TinyEncoder(0)
        sparsify_(m, VNMConfig("8:2:5", score="abs", permute=False, min_numel=0), progress=False)
        return m

    def stop(_model):
        raise Interrupt

    full = recover_(student(), stream, checkpoint_dir=tmp_path / "a", **kw)
    with pytest.raises(Interrupt):  # after the checkpoint of step 4
        recover_(student(), stream, checkpoint_dir=tmp_path / "b", eval_fn=stop, eval_every=4, **kw)
    resumed = recover_(student(), stream, checkpoint_dir=tmp_path / "b", **kw)
    assert resumed.resumed_from == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_rows_without_special_tokens():  # a GPT-2 style batch: every attended token is content
    ids = torch.tensor([[1001, 1002, 1003, 1004, 1005, 1006], [1007, 1008, 1009, PAD, PAD, PAD]])
    plain = {"input_ids": ids, "attention_mask": (ids != PAD).long()}
    stream = AugmentedBatches([plain], AugmentConfig(0.0, crop=1.0, min_crop=0.5), special_ids=(PAD,), pad_id=PAD)
    rows = [[1001, 1002, 1003, 1004, 1005, 1006], [1007, 1008, 1009]]
    for b in itertools.islice(stream, 5):
        for r, m, old in zip(b["input_ids"], b["attention_mask"], rows, strict=True):
            new = r[m.bool()].tolist()
            assert math.ceil(0.5 * len(old)) <= len(new) and contiguous_in(new, old)
