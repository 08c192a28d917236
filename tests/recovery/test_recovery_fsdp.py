"""recover_ under FSDP2 (fully_shard) on CPU: 2 processes, gloo, launched with torchrun (fsdp_worker.py).

Masks exact on every shard after steps and after a resume, a sharded checkpoint resumes bit-for-bit,
and one written by 2 ranks resumes on 1; the methods that do not run sharded refuse clearly.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)
WORKER = Path(__file__).with_name("fsdp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(WORKER), *args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def records(out: Path, tag: str, world: int) -> list[dict]:
    return [json.loads((out / f"{tag}_rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """10 steps on 2 ranks; the checkpoint of step 8 stays in ``ckpt`` (written every 4 steps)."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "out").mkdir()
    torchrun(2, "--tag", "full", "--out", str(root / "out"), "--ckpt", str(root / "ckpt"))
    return root


def test_masks_exact_on_every_shard_after_steps(full_run):
    for rec in records(full_run / "out", "full", 2):
        assert rec["world"] == 2 and rec["resumed_from"] == 0
        assert len(rec["checks"]) == 6 and all(c["exact"] for c in rec["checks"])  # steps 2..10 and after the merge
        assert rec["final_exact"]
        assert rec["losses"][-1] < rec["losses"][0]
    state = torch.load(full_run / "out" / "full_state.pt")
    assert state["0.weight"].shape == (37, 21)  # gathered from two uneven shards (19 + 18 rows)
    assert (full_run / "ckpt" / "latest").read_text() == "step_00000008"
    assert sorted(p.name for p in (full_run / "ckpt").iterdir()) == ["latest", "step_00000008"]


def test_sharded_checkpoint_resumes_bit_for_bit(full_run):
    ckpt = full_run / "ckpt_resume"
    shutil.copytree(full_run / "ckpt", ckpt)
    torchrun(2, "--tag", "resumed", "--out", str(full_run / "out"), "--ckpt", str(ckpt))
    for full, resumed in zip(
        records(full_run / "out", "full", 2), records(full_run / "out", "resumed", 2), strict=True
    ):
        assert resumed["resumed_from"] == 8
        assert resumed["losses"] == full["losses"]  # each rank's own history, continued exactly
        assert all(c["exact"] for c in resumed["checks"]) and resumed["final_exact"]
    a = torch.load(full_run / "out" / "full_state.pt")
    b = torch.load(full_run / "out" / "resumed_state.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_of_two_ranks_resumes_on_one(full_run):
    ckpt = full_run / "ckpt_world1"
    shutil.copytree(full_run / "ckpt", ckpt)
    torchrun(1, "--tag", "world1", "--out", str(full_run / "out"), "--ckpt", str(ckpt))
    (rec,) = records(full_run / "out", "world1", 1)
    assert rec["world"] == 1 and rec["resumed_from"] == 8
    assert all(c["exact"] for c in rec["checks"]) and rec["final_exact"]
    full0 = records(full_run / "out", "full", 2)[0]
    assert rec["losses"][:8] == full0["losses"][:8]  # rank 0's history carried over


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of this process alone (file store: no port)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def sharded_mlp():
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from vnm_compile import VNMConfig, sparsify_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    sparsify_(model, VNMConfig("8:2:5", score="abs", permute=False, min_numel=0), progress=False)
    fully_shard(model)
    return model


def test_mask_guard_masks_sharded_gradients(world_of_one):
    """Gradient hooks never fire on FSDP's sharded weights: mask_grads() is what zeroes the pruned entries."""
    from vnm_compile import get_sparsity
    from vnm_compile.recovery import MaskGuard, is_sharded, mask_like

    model = sharded_mlp()
    assert is_sharded(model)
    guard = MaskGuard(model)
    model(torch.randn(5, 16)).square().mean().backward()
    w = model[0].weight
    mask = mask_like(get_sparsity(model[0]).mask, w).to_local()
    assert (w.grad.to_local()[~mask] != 0).any()  # the hook did not run
    assert guard.mask_grads() == 2
    assert (w.grad.to_local()[~mask] == 0).all() and (w.grad.to_local()[mask] != 0).any()
    guard.remove()


@pytest.mark.parametrize("method", ["srste", "three_stage"])
def test_unsupported_methods_refuse_sharded_models(method, world_of_one):
    """The refusal names the method, what is supported and why."""
    from vnm_compile.recovery import recover_

    model = sharded_mlp()
    with pytest.raises(NotImplementedError, match=f"method='{method}'.*supported sharded: \\('fixed',\\)"):
        recover_(model, [torch.randn(4, 16)], method=method, steps=2, loss=lambda m, b: m(b).square().mean())


def test_exit_rank_flushes_and_skips_the_teardown(tmp_path):
    """exit_rank ends the process with the code given, its buffered output written, and no atexit handler run."""
    marker = tmp_path / "atexit_ran"
    script = (
        "import atexit, pathlib, sys\n"
        "from vnm_compile.recovery.distributed import exit_rank\n"
        f"atexit.register(lambda: pathlib.Path({str(marker)!r}).write_text('ran'))\n"
        "print('results written', end='')\n"
        "sys.stderr.write('done')\n"
        "exit_rank(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "results written", "done")
    assert not marker.exists()
