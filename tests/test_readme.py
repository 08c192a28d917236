"""The README's Python examples run as written (in order, one namespace, on CPU), its first two
commands are the ones CI runs, and the scripts the README and docs/ name exist (or, in docs/, are named
with the commit that holds them; docs/lean_core.md maps the removed ones result files still quote)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# a benchmark or tool script named by its path from the repository root (not tests/benchmarks/...)
SCRIPT = re.compile(r"(?<![\w/])(?:benchmarks|tools)/[\w/-]+\.py\b")
COMMIT = re.compile(r"`[0-9a-f]{7,40}`")


def _python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_opens_with_the_two_commands_ci_runs():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert first == [
        "pip install torch==2.13.0 -e '.[demo]' && vnm demo",
        "pip install torch==2.13.0 -e '.[test]' && TRITON_INTERPRET=1 python -m pytest -q",
    ]
    assert first[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnx", reason="the export example needs the export extra")
    pytest.importorskip("onnxscript", reason="the export example needs the export extra")
    blocks = _python_blocks()
    assert len(blocks) >= 3, "the quick start, recovery and export examples"
    monkeypatch.chdir(tmp_path)  # the export example writes model.onnx
    namespace: dict = {"__name__": "readme"}

    def run(i: int) -> None:
        exec(compile(blocks[i], f"README.md python block {i + 1}", "exec"), namespace)

    import torch

    from vnm_compile import is_vnm
    from vnm_compile.state import get_sparsity

    # 1. quick start: the compiled model computes what the eager sparsified one does
    run(0)
    model, x = namespace["model"], namespace["batches"][0]
    with torch.no_grad():
        torch.testing.assert_close(namespace["y"], model(x), rtol=1e-4, atol=1e-4)
        assert (namespace["y"] - namespace["dense"](x)).abs().max() > 1e-3  # and it is pruned
    assert "64:2:8" in capsys.readouterr().out  # the sparsify and compile reports
    # 2. recovery and export: the pattern survives training, the ONNX file is written
    for i in range(1, len(blocks)):
        run(i)
    for layer in (model[0], model[2]):
        state = get_sparsity(layer.weight)
        assert state is not None and str(state.pattern) == "64:2:8"
        assert is_vnm(layer.weight != 0, state.pattern, state.in_perm, state.out_perm)
    assert namespace["result"] is not None
    assert (tmp_path / "model.onnx").is_file()
    # 3. compressed deployment: the checkpoint loaded into a meta-built model computes the sparsified function
    from vnm_compile.deploy import VNMLinear

    fresh = namespace["fresh"]
    assert isinstance(fresh[0], VNMLinear) and isinstance(fresh[2], VNMLinear)
    with torch.no_grad():
        torch.testing.assert_close(namespace["y_deployed"], namespace["deployed"](x), rtol=1e-4, atol=1e-4)


def _missing(paths) -> list[str]:
    return sorted({p for p in paths if not (ROOT / p).is_file()})


def test_readme_names_only_scripts_that_exist():
    assert SCRIPT.findall(README), "the README quotes benchmark commands"
    assert not _missing(SCRIPT.findall(README)), "README.md names scripts that are not in the tree"


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs; a table counts as part of the paragraph that introduces it."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        if out and block.lstrip().startswith("|"):
            out[-1] += "\n" + block
        else:
            out.append(block)
    return out


def test_docs_name_scripts_that_exist_or_their_commit():
    """A command in docs/ (``python benchmarks/x.py``) runs a script in the tree; a script named only as
    history has the commit that holds it in the same paragraph."""
    bad = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        if doc.name == "lean_core.md":  # the map from removed commands to their replacements
            continue
        for para in _paragraphs(doc.read_text()):
            commands = re.findall(r"python3? (?:-m \S+ )?((?:benchmarks|tools)/[\w/-]+\.py)", para)
            bad += [f"{doc.name}: command {p}" for p in _missing(commands)]
            if not COMMIT.search(para):
                bad += [f"{doc.name}: {p} (no commit named)" for p in _missing(SCRIPT.findall(para))]
    assert not bad, bad


def test_removed_scripts_that_results_quote_are_mapped():
    """Result files keep the command that made them; where its script left the tree, docs/lean_core.md says
    what replaces it."""
    note = (ROOT / "docs" / "lean_core.md").read_text()
    quoted = {
        p: md.relative_to(ROOT)
        for md in sorted((ROOT / "benchmarks" / "results").rglob("*.md"))
        for p in SCRIPT.findall(md.read_text())
    }
    unmapped = [f"{p} (quoted in {quoted[p]})" for p in _missing(quoted) if p not in note]
    assert not unmapped, f"docs/lean_core.md does not map: {unmapped}"


def test_readme_options_cover_every_option_and_keep_developer_ones_apart():
    """Every compile option and VNMConfig field is in the README's Options section; the developer options
    (debugging and tests) are not rows of the user's table."""
    from dataclasses import fields

    from vnm_compile import VNMConfig
    from vnm_compile.passes.context import CompileOptions

    section = README.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = {m for line in section.splitlines() if line.startswith("| `") for m in re.findall(r"`(\w+)`", line)}
    developer = {"inductor", "force_sparse"}
    missing = [f.name for f in fields(CompileOptions) if f.name not in developer and f.name not in rows]
    missing += [f.name for f in fields(VNMConfig) if not f.name.startswith("_") and f.name not in rows]
    assert not missing, f"options without a row in the README's Options tables: {missing}"
    assert not developer & {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert all(f"`{name}=" in section for name in developer), "the developer options' line"
