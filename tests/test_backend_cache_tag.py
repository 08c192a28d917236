"""Inductor's FX graph cache must not hand this version of vnm_compile a graph compiled by another one: the
generated code calls the vnm ops with the argument list of the version that compiled it (a cached graph from
a version whose vnm::compressed_linear took a fifth argument failed here with "expected at most 4
argument(s)"). The backend compiles under a cache key tag that holds the ops' schemas."""

import torch
from torch import nn

import vnm_compile  # noqa: F401  (registers the backend)
from vnm_compile import VNMConfig, sparsify_
from vnm_compile.backend import _cache_key_tag


def test_the_tag_holds_the_ops_schemas_and_keeps_the_users():
    tag = _cache_key_tag()
    assert tag.startswith("vnm-") and len(tag) == 20
    with torch.compiler.config.patch(cache_key_tag="mine"):
        assert _cache_key_tag() == "mine+" + tag


def test_inductor_compiles_under_the_tag(monkeypatch):
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx

    def spy(*args, **kwargs):
        seen.append(torch.compiler.config.cache_key_tag)
        return real(*args, **kwargs)

    monkeypatch.setattr(cfx, "compile_fx", spy)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sparsify_(model, VNMConfig("16:2:8", score="abs", permute=False, min_numel=0), progress=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="vnm", options={"force_sparse": True})(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert seen == [_cache_key_tag()]
    assert torch.compiler.config.cache_key_tag == ""  # restored after the compile
