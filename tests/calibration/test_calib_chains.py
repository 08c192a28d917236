"""find_chains / calibrate's stats.chains: linears joined by element-wise ops only (calibration/chains.py)."""

import pytest
import torch
from torch import nn

from vnm_compile import calibrate
from vnm_compile.calibration.chains import find_chains

transformers = pytest.importorskip("transformers")


def test_llama_bert_vit_mlps_are_found_and_nothing_else():
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )  # fmt: skip
    ).eval()
    chains = find_chains(llama, torch.randint(0, 64, (2, 7)))
    assert chains == [
        ((f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"), (f"model.layers.{i}.mlp.down_proj",))
        for i in range(2)
    ]
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2
        )  # fmt: skip
    ).eval()
    chains = find_chains(bert, torch.randint(0, 64, (2, 5)))
    assert chains == [
        ((f"encoder.layer.{i}.intermediate.dense",), (f"encoder.layer.{i}.output.dense",)) for i in range(2)
    ]
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        )  # fmt: skip
    ).eval()
    ((producers, consumers),) = find_chains(vit, torch.randn(1, 3, 16, 16))
    assert len(producers) == 1 and len(consumers) == 1 and producers[0] != consumers[0]
    # calibrate traces them too (without its own observer hooks counting as uses)
    stats = calibrate(bert, [torch.randint(0, 64, (2, 5))], progress=False)
    assert len(stats.chains) == 2


class _Mlp(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc1, self.fc2, self.side = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(24, 8)
        self.scale = nn.Parameter(torch.rand(24))
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.kind == "scaled":  # a per-channel scale: not equivariant under a channel permutation
            h = h * self.scale
        elif self.kind == "norm":
            h = self.norm(h)
        elif self.kind == "chunk":
            a, b = h.chunk(2, dim=-1)
            h = torch.cat([b, a], -1)
        elif self.kind == "two_readers":  # a second linear of another shape reads it: both consumers
            return self.fc2(h) + self.side(h).sum(-1, keepdim=True)
        elif self.kind == "token_scale":  # broadcast over channels: still equivariant
            h = h * x[..., :1] * 0.5
        return self.fc2(h)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("plain", [(("fc1",), ("fc2",))]),
        ("token_scale", [(("fc1",), ("fc2",))]),
        ("two_readers", [(("fc1",), ("fc2", "side"))]),
        ("scaled", []),
        ("norm", []),
        ("chunk", []),
    ],
)
def test_only_element_wise_paths_make_a_chain(kind, expected):
    assert find_chains(_Mlp(kind), torch.randn(3, 16)) == expected


def test_filtered_out_consumer_breaks_the_chain():
    assert find_chains(_Mlp("plain"), torch.randn(3, 16), filter_fn=lambda n, m: n != "fc2") == []
