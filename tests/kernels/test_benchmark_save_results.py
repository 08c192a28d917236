"""kernels.benchmark.save_results: how every benchmark script writes its result (CPU): the folder is made,
<stem>.json is the indent=1 JSON of the result, <stem>.md is written and printed only when asked."""

import json

import torch

from vnm_compile.kernels.benchmark import save_results, save_results_at

RESULT = {"meta": {"gpu": "cpu", "load_average": [0.5, 0.25, 0.0]}, "records": [{"tokens": 16, "us": 12.5}]}


def test_json_and_markdown_are_written_into_a_new_folder_and_the_markdown_printed(tmp_path, capsys):
    out = tmp_path / "results" / "some-gpu"
    paths = save_results(out, "bench", RESULT, "# table\n")
    assert paths == [out / "bench.json", out / "bench.md"]
    assert (out / "bench.json").read_text() == json.dumps(RESULT, indent=1)  # the format of existing results
    assert json.loads((out / "bench.json").read_text()) == RESULT
    assert (out / "bench.md").read_text() == "# table\n"
    assert capsys.readouterr().out == "# table\n\n"


def test_echo_false_writes_the_markdown_without_printing_it(tmp_path, capsys):
    paths = save_results(tmp_path, "bench", RESULT, "# table\n", echo=False)
    assert [p.name for p in paths] == ["bench.json", "bench.md"]
    assert (tmp_path / "bench.md").read_text() == "# table\n"
    assert capsys.readouterr().out == ""


def test_without_markdown_only_json_is_written_and_nothing_printed(tmp_path, capsys):
    rows = [{"config": "a", "us": 1.0}]  # a list result (bench_linear --configs)
    paths = save_results(tmp_path, "e2e.partial", rows)
    assert paths == [tmp_path / "e2e.partial.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e2e.partial.json"]
    assert json.loads(paths[0].read_text()) == rows
    assert capsys.readouterr().out == ""


def test_an_existing_file_is_replaced_and_a_value_json_cannot_hold_is_written_as_its_string(tmp_path):
    save_results(tmp_path, "bench", {"old": 1})
    save_results(tmp_path, "bench", {"dtype": torch.float16})
    assert json.loads((tmp_path / "bench.json").read_text()) == {"dtype": "torch.float16"}


def test_save_results_at_names_the_files_by_the_path(tmp_path):
    paths = save_results_at(tmp_path / "sub" / "table.md", {"a": 1}, "# t\n", echo=False)
    assert paths == [tmp_path / "sub" / "table.json", tmp_path / "sub" / "table.md"]
    assert json.loads(paths[0].read_text()) == {"a": 1} and paths[1].read_text() == "# t\n"
    assert save_results_at(tmp_path / "r", [1]) == [tmp_path / "r.json"]
