"""The V:N:M sparsity pattern and the paper's mask-diversity measure."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["VNMPattern", "mask_diversity", "as_pattern"]

# Columns that survive in every V x M block. Fixed by the format: the kept
# columns form a 2:4 (N:4) problem that sparse tensor cores understand.
KEPT_COLUMNS = 4


@dataclass(frozen=True)
class VNMPattern:
    """V:N:M sparsity: in each block of ``v`` rows x ``m`` columns, 4 columns
    survive (the same 4 for all ``v`` rows) and each row keeps ``n`` of them.

    ``m == 4`` is plain N:4 (``v`` is then irrelevant). Density is ``n / m``.
    """

    v: int
    n: int
    m: int

    def __post_init__(self) -> None:
        for field in ("v", "n", "m"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"VNMPattern.{field} must be an int, got {value!r}")
        if self.v < 1:
            raise ValueError(f"VNMPattern.v must be >= 1, got v={self.v}")
        if self.n < 1:
            raise ValueError(f"VNMPattern.n must be >= 1, got n={self.n}")
        if self.n >= KEPT_COLUMNS:
            raise ValueError(f"VNMPattern.n must be < {KEPT_COLUMNS} (n of the 4 kept columns per row), got n={self.n}")
        if self.m < KEPT_COLUMNS:
            raise ValueError(f"VNMPattern.m must be >= {KEPT_COLUMNS}, got m={self.m}")

    @classmethod
    def parse(cls, text: str) -> VNMPattern:
        """Parse ``"V:N:M"`` (e.g. ``"64:2:5"``) or ``"N:4"`` (e.g. ``"2:4"``)."""
        if isinstance(text, VNMPattern):
            return text
        if not isinstance(text, str):
            raise ValueError(f"pattern must be a string like '64:2:5', got {type(text).__name__}")
        parts = text.strip().split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"pattern {text!r} is not of the form 'V:N:M' with integers") from None
        if len(numbers) == 2 and numbers[1] == KEPT_COLUMNS:
            return cls(1, numbers[0], numbers[1])
        if len(numbers) != 3:
            raise ValueError(f"pattern {text!r} is not of the form 'V:N:M' (or 'N:4')")
        return cls(*numbers)

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"{self.v}:{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def is_nm(self) -> bool:
        """True for plain N:4, where every column of a group is kept."""
        return self.m == KEPT_COLUMNS


def as_pattern(pattern: VNMPattern | str) -> VNMPattern:
    """Accept a VNMPattern or its string form."""
    return pattern if isinstance(pattern, VNMPattern) else VNMPattern.parse(pattern)


def mask_diversity(pattern: VNMPattern | str) -> float:
    """log K(V, M), K = [C(M, 4) * C(4, n)^V]^(1 / (V * M)) (paper section 4.1).

    Returned in log space: K itself overflows nothing here, but comparisons of
    large V are cleaner in logs.
    """
    p = as_pattern(pattern)
    log_choices = math.log(math.comb(p.m, KEPT_COLUMNS)) + p.v * math.log(math.comb(KEPT_COLUMNS, p.n))
    return log_choices / (p.v * p.m)
