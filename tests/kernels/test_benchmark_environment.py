"""kernels.benchmark.environment: the header every benchmark result records, on a machine without CUDA and
outside a git repository (CPU)."""

import subprocess

import pytest
import torch

from vnm_compile.kernels import benchmark

KEYS = {"gpu", "torch", "triton", "cuda", "python", "machine", "cpus", "threads", "commit", "date_utc", "command"}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_environment_without_cuda_has_the_documented_keys(no_cuda):
    env = benchmark.environment()
    assert env.keys() >= KEYS
    assert env["gpu"] == "cpu" and "gpu_slug" not in env and "dtype" not in env
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads() and env["cpus"] >= 1
    assert isinstance(env["commit"], str) and env["commit"]
    assert env["command"] == benchmark.command_line()
    assert benchmark.environment("cpu", torch.bfloat16)["dtype"] == "bfloat16"
    try:
        import transformers
    except ImportError:
        assert "transformers" not in env
    else:
        assert env["transformers"] == transformers.__version__


def test_commit_in_this_repository():
    commit = benchmark.git_commit()
    assert commit == "unknown" or commit.split()[0].isalnum()  # "unknown" where the tests run without git


def test_commit_outside_a_repository(no_cuda, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    assert benchmark.git_commit(tmp_path) == "unknown"
    assert benchmark.git_commit(tmp_path / "missing") == "unknown"
    assert capfd.readouterr() == ("", "")  # git's complaints are captured, not printed


def test_commit_without_git(no_cuda, monkeypatch):
    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert benchmark.git_commit() == "unknown"
    assert benchmark.environment()["commit"] == "unknown"


def test_environment_records_the_program_in_front_of_the_command(no_cuda):
    assert benchmark.environment(program="python ")["command"] == benchmark.command_line("python ")


def test_environment_line_names_what_ran_the_versions_commit_and_date(no_cuda):
    env = benchmark.environment("cpu")
    line = benchmark.environment_line(env)
    assert line.startswith("CPU only; ") and f"{env['cpus']} CPUs, {env['threads']} threads" in line
    assert f"torch {env['torch']}" in line and f"commit {env['commit']}" in line and env["date_utc"] in line
    assert "cuda None" not in line  # a CPU build of torch has no CUDA version: left out, not printed as None
    gpu = {**env, "gpu": "NVIDIA H100 80GB HBM3", "cuda": "13.0"}
    line = benchmark.environment_line(gpu)
    assert line.startswith("NVIDIA H100 80GB HBM3; ") and "cuda 13.0" in line


def test_markdown_header_is_the_title_command_and_environment_line(no_cuda):
    env = benchmark.environment("cpu", program="python ")
    head = benchmark.markdown_header("a result", env).split("\n\n")
    assert head == ["# a result", f"Command: `{env['command']}`", f"Machine: {benchmark.environment_line(env)}\n"]
