"""`vnm export onnx|tensorrt`: argument handling, output, and the TensorRT error path.

The real command sparsifies and exports the bundled MiniLM (tens of seconds on CPU);
here the model preparation is swapped for a tiny BERT so the command's own code
(export, summary table, onnxruntime check) runs in a few seconds. The MiniLM export
itself is tested in test_export_onnx.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from vnm_compile import VNMConfig, sparsify_
from vnm_compile.cli import build_parser, main

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


def _tiny_bert(args):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )
    model = transformers.BertModel(config).eval()
    report = sparsify_(model, VNMConfig(args.pattern, score="abs", permute=args.permute), progress=False)
    ids = torch.randint(0, 97, (2, 7))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    check_ids = torch.randint(0, 97, (3, 11))
    check = {"input_ids": check_ids, "attention_mask": torch.ones_like(check_ids)}
    return model, example, check, report


@pytest.mark.slow
def test_export_onnx_command(tmp_path, monkeypatch, capsys):
    from vnm_compile.export import cli as export_cli

    monkeypatch.setattr(export_cli, "_prepare_minilm", _tiny_bert)
    out = tmp_path / "tiny.onnx"
    assert main(["export", "onnx", "--pattern", "16:2:5", "--score", "abs", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file()
    assert "VNMLinear nodes                    7" in text  # q, k, v, attention out, intermediate, output, pooler
    diff = float(text.split("max |diff|")[1].split()[0])
    assert diff < 1e-4


def test_export_arguments():
    args = build_parser().parse_args(["export", "onnx", "--out", "m.onnx"])
    assert (args.pattern, args.score, args.opset, args.permute) == ("64:2:5", "ria", 18, False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "onnx"])  # --out is required
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "tflite", "--out", "m"])


def test_export_tensorrt_without_tensorrt_fails_fast(tmp_path, monkeypatch, capsys):
    from vnm_compile.export import cli as export_cli

    def must_not_run(args):
        raise AssertionError("the model must not be prepared when TensorRT is missing")

    monkeypatch.setattr(export_cli, "_prepare_minilm", must_not_run)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["export", "tensorrt", "--out", str(tmp_path / "m.engine")]) == 1
    assert "pip install 'tensorrt>=10.8'" in capsys.readouterr().err
    assert not (tmp_path / "m.engine").exists()


def test_export_onnx_without_the_extra_fails_before_calibrating(tmp_path, monkeypatch, capsys):
    from vnm_compile.export import cli as export_cli
    from vnm_compile.export import onnx as export_onnx

    def missing():
        raise ImportError("ONNX export needs onnxscript: pip install 'vnm_compile[export]'")

    def never(args):
        raise AssertionError("calibrated before checking the export extra")

    monkeypatch.setattr(export_onnx, "_require_onnx", missing)
    monkeypatch.setattr(export_cli, "_prepare_minilm", never)
    assert main(["export", "onnx", "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vnm export onnx: ONNX export needs onnxscript") and "\n" not in err
    monkeypatch.setattr(export_onnx, "_require_onnx", lambda: None)
    assert main(["export", "onnx", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.onnx")]) == 2


def test_export_onnx_of_a_user_model_directory(tmp_path, capsys):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128
    )
    model_dir = tmp_path / "tiny-bert"
    transformers.BertModel(config).save_pretrained(model_dir)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz") + list("0123456789")
    (tmp_path / "vocab.txt").write_text("\n".join(vocab[:40]) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    out = tmp_path / "user.onnx"
    args = ["export", "onnx", "--model", str(model_dir), "--pattern", "16:2:5", "--score", "abs", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "VNMLinear nodes" in text
    assert float(text.split("max |diff|")[1].split()[0]) < 1e-4


def _compressed_checkpoint(tmp_path):
    """A tiny permuted Llama (causal LM), compressed and saved; (model, folder)."""
    from vnm_compile import compress_, save_compressed

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=151, hidden_size=64, intermediate_size=112, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    sparsify_(model, VNMConfig("16:2:5", score="abs", permute=True, min_numel=0), progress=False)
    compress_(model, progress=False)
    folder = tmp_path / "ckpt"
    save_compressed(model, folder, max_shard_size=20_000)
    return model, folder


def test_export_onnx_of_a_compressed_checkpoint(tmp_path, capsys):
    """`vnm export onnx --compressed DIR`: the checkpoint's model built on the meta device, loaded, exported;
    onnxruntime on the file matches the model that was saved."""
    import onnx
    import onnxruntime as ort

    model, folder = _compressed_checkpoint(tmp_path)
    assert (folder / "config.json").is_file()
    out = tmp_path / "c.onnx"
    assert main(["export", "onnx", "--compressed", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "VNMLinear nodes                    7" in text  # q, k, v, o, gate, up, down (lm_head stays dense)
    assert float(text.split("max |diff|")[1].split()[0]) < 1e-4
    proto = onnx.load(str(out))
    assert sum(n.op_type == "VNMLinear" for n in proto.graph.node) == 7
    ids = torch.randint(0, 151, (2, 13))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids.numpy(), "attention_mask": torch.ones_like(ids).numpy()}
    )[0]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)


def test_export_onnx_of_a_compressed_checkpoint_rejects_bad_folders(tmp_path, capsys):
    _, folder = _compressed_checkpoint(tmp_path)
    out = str(tmp_path / "c.onnx")
    assert main(["export", "onnx", "--compressed", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert "not a save_compressed folder" in capsys.readouterr().err
    assert main(["export", "onnx", "--compressed", str(folder), "--model", str(folder), "--out", out]) == 2
    assert "not both" in capsys.readouterr().err
    (folder / "config.json").unlink()
    assert main(["export", "onnx", "--compressed", str(folder), "--out", out]) == 2
    assert "no config.json" in capsys.readouterr().err
