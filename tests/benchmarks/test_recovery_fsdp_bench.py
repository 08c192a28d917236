"""benchmarks/recovery_fsdp.py end to end on CPU: a tiny Llama, 2 gloo ranks under torchrun, 64:2:5 fixed masks.

The loss falls, masks stay exact on every rank's shards, and the run resumed from the sharded
checkpoint repeats the uninterrupted one bit for bit.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_llama_two_ranks(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={port}", str(ROOT / "benchmarks" / "recovery_fsdp.py"), "--tiny", "--layers", "2",
           "--steps", "30", "--lr", "1e-3", "--checkpoint-at", "20", "--eval-every", "5",
           "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "r")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["machine"]["world"] == 2
    assert r["masks_exact_every_check"] and r["checks"] == [7, 7, 3, 3]  # every 5 steps + after the merge
    assert r["resumed_losses_bit_for_bit"] and r["resumed_weights_bit_for_bit"]
    assert r["resumed_weights_differing"] == []
    first = sum(r["losses_rank0"][:5]) / 5
    last = sum(r["losses_rank0"][-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert (tmp_path / "r.md").exists()
