"""Bad input gets one clear paragraph (what, which input, what to do), exit code 2, and nothing written."""

from __future__ import annotations

import json
import shutil

import pytest

from llmopt.cli import main
from llmopt.errors import USER_ERROR_EXIT



@pytest.fixture(scope="module")
def tiny_folder(tiny_llama):
    return tiny_llama


def run_cli(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: " in err
    return err[err.index("error: "):]  # after any progress lines


def copy_model(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    return folder


def test_missing_config(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    (folder / "config.json").unlink()
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{folder}: there is no config.json in this folder." in err
    assert "hint: A Hugging Face model folder holds config.json" in err
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{weights}: the file is cut short" in err
    assert "Download or copy the file again" in err
    assert not (tmp_path / "out").exists()


def test_unknown_architecture(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert "architecture 'GPTNeoXForCausalLM' is not supported" in err
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in err


def test_weight_with_wrong_shape(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert "weight 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64], config.json implies [100, 64]" in err


def test_unknown_target(tiny_folder, tmp_path, capsys):
    err = run_cli(capsys, "build", str(tiny_folder), "--target", "tpu", "-o", str(tmp_path / "out"))
    assert "unknown target 'tpu'" in err and "Known targets: cpu" in err


def test_existing_output_is_not_replaced(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = run_cli(capsys, "build", str(tiny_folder), "-o", str(out))
    assert f"output {out} already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_pass(tiny_folder, tmp_path, capsys):
    err = run_cli(capsys, "ir", str(tiny_folder), "--disable-pass", "no-such-pass")
    assert "no-such-pass" in err and "Known passes" in err


def test_not_an_artifact(tmp_path, capsys):
    err = run_cli(capsys, "run", str(tmp_path), "--prompt", "hi")
    assert str(tmp_path) in err
