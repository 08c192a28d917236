"""The 2:4 baseline: cuSPARSELt through torch._cslt_compress / torch._cslt_sparse_mm.

cuSPARSELt multiplies a compressed 2:4 weight A (out x in) by a dense B
(in x tokens). It is much faster when B is feature-major (a contiguous
(in, tokens) tensor) than when B is the x.t() view of token-major
activations (measured on the H100; bench_linear times it so, linear.json's meta.cslt_layout), so ``CSLTLinear`` takes feature-major
activations and returns feature-major outputs; ``linear`` wraps token-major
x with the two transposes for callers that have nothing better. The best
algorithm is searched once per token count (torch._cslt_sparse_mm_search).
cuSPARSELt refuses some tiny token counts (1 token: benchmarks/results/nvidia-h200/e2e.md); those raise.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor

__all__ = ["CSLTLinear", "cusparselt_available"]

log = logging.getLogger(__name__)


def cusparselt_available(device: torch.device | str | None = None) -> bool:
    """True when torch has cuSPARSELt and the device is a CUDA GPU of compute capability >= 8.0."""
    if not torch.cuda.is_available():
        return False
    backend = getattr(torch.backends, "cusparselt", None)
    if backend is None or not backend.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return False
    return torch.cuda.get_device_capability(dev) >= (8, 0)


class CSLTLinear:
    """A 2:4-sparse weight compressed for cuSPARSELt.

    Args:
        weight: (out, in) fp16/bf16 CUDA tensor whose every 4 consecutive
            input columns hold at most 2 non-zeros per row (already pruned).
        bias: optional (out,) tensor.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError("weight must be a 2-D tensor")
        if not weight.is_cuda:
            raise ValueError(f"cuSPARSELt needs a CUDA weight, got {weight.device}")
        if weight.dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"cuSPARSELt baseline takes fp16/bf16 weights, got {weight.dtype}")
        if not cusparselt_available(weight.device):
            raise RuntimeError("cuSPARSELt is not available in this torch build / on this GPU")
        self.out_features, self.in_features = weight.shape
        self.compressed = torch._cslt_compress(weight.contiguous())
        self.bias = None if bias is None else bias.to(weight.dtype).contiguous()
        self._alg: dict[int, int] = {}

    def _alg_id(self, x_fm: Tensor) -> int:
        tokens = x_fm.shape[1]
        if tokens not in self._alg:
            if torch.cuda.is_current_stream_capturing():
                return 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the search is marked deprecated in some torch versions
                self._alg[tokens] = int(torch._cslt_sparse_mm_search(self.compressed, x_fm, bias=self.bias))
            log.debug("cuSPARSELt alg for %d tokens: %d", tokens, self._alg[tokens])
        return self._alg[tokens]

    def feature_major(self, x_fm: Tensor) -> Tensor:
        """(in, tokens) contiguous activations -> (out, tokens)."""
        if x_fm.dim() != 2 or x_fm.shape[0] != self.in_features:
            raise ValueError(f"x_fm must be ({self.in_features}, tokens), got {tuple(x_fm.shape)}")
        x_fm = x_fm.contiguous()
        return torch._cslt_sparse_mm(self.compressed, x_fm, bias=self.bias, alg_id=self._alg_id(x_fm))

    def linear(self, x: Tensor) -> Tensor:
        """Token-major (..., in) -> (..., out), paying two transposes."""
        x2 = x.reshape(-1, self.in_features)
        y = self.feature_major(x2.t().contiguous()).t()
        return y.reshape(*x.shape[:-1], self.out_features)
