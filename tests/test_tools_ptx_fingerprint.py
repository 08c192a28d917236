"""tools/ptx_fingerprint.py: Triton PTX compiled offline (no GPU), hashed without debug information."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "ptx_fingerprint.py"


def _tool():
    spec = importlib.util.spec_from_file_location("ptx_fingerprint", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_debug_information_is_stripped():
    ptx = (
        '\t.file\t1 "k.py"\n\tld.global.b32 %r1, [%rd1];\n\t.loc\t1 42 7\n$L__tmp0:\n\tret;\n.section\t.debug_info\n{ }'
    )
    assert _tool().strip_debug(ptx) == "\tld.global.b32 %r1, [%rd1];\n\tret;"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_fingerprints_are_deterministic_and_tell_variants_apart():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter does not compile
    runs = [
        subprocess.run(
            [sys.executable, str(TOOL), "--kinds", "fma"], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    lines = runs[0].stdout.splitlines()
    assert runs[1].stdout.splitlines() == lines and len(lines) == 8  # 2 x 2 x 2 variants
    assert len({line.split()[-2] for line in lines}) == 8  # every variant its own code


def test_refuses_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(TOOL)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr
