"""The suite's markers: GPU tests say so with the ``gpu`` marker (tests/conftest.py skips them without a
GPU), never with an ad-hoc ``skipif`` on ``torch.cuda.is_available()``; every marker pyproject.toml
declares is used."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = sorted((ROOT / "tests").rglob("*.py"))

# a skipif whose condition (up to its reason) asks whether CUDA is there
_ADHOC = re.compile(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)")


def test_no_adhoc_gpu_skips():
    offenders = [
        f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}"
        for path in TESTS
        for text in [path.read_text()]
        for m in _ADHOC.finditer(text)
    ]
    assert not offenders, f"use @pytest.mark.gpu (tests/conftest.py) instead of a skipif: {offenders}"


def test_declared_markers_are_used():
    block = re.search(r"^markers = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), flags=re.S | re.M).group(1)
    declared = re.findall(r'^\s*"(\w+):', block, flags=re.M)
    assert {"gpu", "slow"} <= set(declared), declared
    text = "\n".join(path.read_text() for path in TESTS if path.name != Path(__file__).name)
    unused = [name for name in declared if not re.search(rf"(pytest\.)?mark\.{name}\b", text)]
    assert declared and not unused, f"markers declared in pyproject.toml but used by no test: {unused}"
