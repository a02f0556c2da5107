"""Bad input gets one clear paragraph (what, which input, what to do), exit code 2, and nothing written:
no output folder and no temporary sibling left behind. A bug exits with code 70, also writing nothing.

One test per row of the README's "Bad input" table (the runtime's and the torch frontend's rows are
tested in tests/runtime, tests/reliability and tests/frontend_torch).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from gguf_tiny_models import tiny_model as tiny_torch_model, write_gguf
from safetensors.numpy import load_file, save_file

from llmopt.cli import main
from llmopt.errors import INTERNAL_ERROR_EXIT, USER_ERROR_EXIT, LLMOptError


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


def assert_nothing_written(out) -> None:
    """Neither ``out`` nor a temporary (``.out.tmp-PID``) or moved-aside (``.out.old-PID``) sibling exists."""
    assert not os.path.lexists(out)
    if out.parent.is_dir():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == []


def copy_model(tiny_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)
    return folder


def edit_weights(folder, edit) -> None:
    """Rewrite ``folder``'s model.safetensors with ``edit(weights)`` applied to its dict of arrays."""
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


# --- the model -----------------------------------------------------------------------------------------


def test_missing_config(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    (folder / "config.json").unlink()
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{folder}: there is no config.json in this folder." in err
    assert "hint: A Hugging Face model folder holds config.json" in err
    assert_nothing_written(tmp_path / "out")


def test_malformed_config(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[:len(text) // 2])
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{folder / 'config.json'}: not valid JSON (" in err
    assert "hint: Restore the file from the original model." in err
    assert_nothing_written(tmp_path / "out")


def test_unknown_architecture(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{folder / 'config.json'}: architecture 'GPTNeoXForCausalLM' is not supported" in err
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM" in err
    assert_nothing_written(tmp_path / "out")


def test_truncated_safetensors(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{weights}: the file is cut short" in err
    assert "Download or copy the file again" in err
    assert_nothing_written(tmp_path / "out")


def test_corrupt_safetensors_header(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    data[8 + length // 2] = ord("}")  # the header's JSON now ends half-way, with bytes after it
    weights.write_bytes(bytes(data))
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert f"{weights}: the safetensors header is not valid JSON." in err
    assert "Download or copy the file again" in err
    assert_nothing_written(tmp_path / "out")


def test_weight_with_wrong_shape(tiny_folder, tmp_path, capsys):
    folder = copy_model(tiny_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert (f"{folder / 'model.safetensors'}: weight 'model.layers.0.mlp.gate_proj.weight' has shape [96, 64], "
            "config.json implies [100, 64]") in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("dtype, stored", [(np.int32, "I32"), (np.bool_, "BOOL")])
def test_weight_with_wrong_dtype(tiny_folder, tmp_path, capsys, dtype, stored):
    folder = copy_model(tiny_folder, tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"

    def to_dtype(weights):
        weights[name] = weights[name].astype(dtype)
    edit_weights(folder, to_dtype)
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert (f"{folder / 'model.safetensors'}: weight '{name}' is stored as {stored}, not as a float type "
            "(F32, F16, BF16, F64)") in err
    assert "hint: The file is damaged, or holds a quantized checkpoint" in err
    assert_nothing_written(tmp_path / "out")


def test_weight_with_nan_and_inf(tiny_folder, tmp_path, capsys):
    """Found when the weight is read (the write step, after compiling): the writer's temporary
    folder, which already holds the library, is removed."""
    folder = copy_model(tiny_folder, tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"

    def damage(weights):
        weights[name][3, 17] = np.nan
        weights[name][5, 0] = -np.inf
        weights[name][60, 95] = np.nan
    edit_weights(folder, damage)
    err = run_cli(capsys, "build", str(folder), "-o", str(tmp_path / "out"))
    assert (f"{folder / 'model.safetensors'}: weight '{name}' holds 2 NaN and 1 Inf value(s) of 6144 "
            "(the first at index [3, 17])") in err
    assert "hint: The checkpoint is damaged" in err and "re-export it" in err
    assert_nothing_written(tmp_path / "out")


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """Write a tiny Qwen2 GGUF with a vocabulary (``edit(torch_model)`` first); its tokenizer.json goes to a
    cache under tmp_path."""
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path / "cache"))

    def make(edit=lambda model: None):
        model = tiny_torch_model("qwen2")
        with torch.no_grad():
            edit(model)
        return write_gguf(model, tmp_path / "tiny.gguf", "qwen2", vocabulary=True)
    return make


def test_not_a_gguf(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUX" + bytes(64))
    err = run_cli(capsys, "build", str(path), "-o", str(tmp_path / "out"))
    assert f"{path}: not a GGUF file (it starts with b'GGUX'; GGUF files start with b'GGUF')" in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("keep", [0.5, 0.9])  # cut in the metadata / in the tensor data
def test_truncated_gguf(tiny_gguf, tmp_path, capsys, keep):
    path = tiny_gguf()
    data = path.read_bytes()
    header_end = data.index(b"blk.") if keep == 0.5 else len(data)
    path.write_bytes(data[:int(header_end * keep)])
    err = run_cli(capsys, "build", str(path), "-o", str(tmp_path / "out"))
    assert f"{path}: the GGUF file is cut short or corrupt" in err
    assert "Download or copy the file again" in err
    assert_nothing_written(tmp_path / "out")


def test_gguf_weight_with_nan(tiny_gguf, tmp_path, capsys):
    def damage(model):
        model.model.layers[0].self_attn.q_proj.weight[5, 3] = float("nan")
    path = tiny_gguf(damage)
    err = run_cli(capsys, "build", str(path), "-o", str(tmp_path / "out"))
    assert f"{path}: weight 'blk.0.attn_q.weight' holds 1 NaN value(s) of 4096 (the first at index [5, 3])" in err
    assert "hint: The checkpoint is damaged" in err
    assert_nothing_written(tmp_path / "out")


# --- the options --------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, words", [
    (["--target", "tpu"], ["unknown target 'tpu'", "Known targets: cpu"]),
    (["--arch", "pentium-9000"], ["target cpu: unknown --arch 'pentium-9000'", "an LLVM CPU name"]),
    (["--quant", "int5"], ["int5", "w8", "w4g128"]),
    (["--quant", "magic:w8"], ["unknown quantization method 'magic' in --quant magic:w8", "rtn, gptq, awq"]),
    (["--prune", "prune:0.5"], ["prune", "magnitude, wanda, sparsegpt"]),
    (["--prune", "wanda:1.5"], ["1.5", "[0, 1)"]),
    (["--quant", "gptq:w4g128", "--calib", "samples"], ["--calib 'samples' is not KEY=VALUE"]),
    (["--quant", "gptq:w4g128", "--calib", "texts=a.txt"], ["unknown calibration option 'texts'"]),
    (["--disable-pass", "no-such-pass"], ["--disable-pass names unknown pass(es): no-such-pass", "Known passes"]),
])
def test_bad_option(tiny_folder, tmp_path, capsys, options, words):
    err = run_cli(capsys, "build", str(tiny_folder), *options, "-o", str(tmp_path / "out"))
    assert all(word in err for word in words), err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("text, words", [("", ["is empty", "Pass a file with some pages of text"]),
                                         ("w1 w2 w3\n", ["has 3 tokens, fewer than one window of seq_len=256",
                                                         "Pass a longer text or a smaller seq_len"])])
@pytest.mark.parametrize("options", [["--quant", "gptq:w4g128"], ["--prune", "wanda:0.5"]])
def test_bad_calibration_text(tiny_folder, tmp_path, capsys, text, words, options):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(text)
    err = run_cli(capsys, "build", str(tiny_folder), *options, "--calib", f"calibration={calibration}",
                  "-o", str(tmp_path / "out"))
    assert f"calibration text {calibration} " in err and all(word in err for word in words), err
    assert_nothing_written(tmp_path / "out")


# --- the output ---------------------------------------------------------------------------------------


def test_existing_output_is_not_replaced(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = run_cli(capsys, "build", str(tiny_folder), "-o", str(out))
    assert f"output {out} already exists" in err and "--force" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("below", ["out", "sub/out"])
def test_output_under_a_file(tiny_folder, tmp_path, capsys, below):
    """Not writable even for root: a file stands where a folder must be."""
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / below
    err = run_cli(capsys, "build", str(tiny_folder), "-o", str(out))
    assert f"output {out} cannot be written: {tmp_path / 'file'} is a file, not a folder." in err
    assert (tmp_path / "file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_writer_names_the_output_when_a_folder_cannot_be_made(tmp_path):
    from llmopt.codegen.artifact_writer import _make_dir
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    with pytest.raises(LLMOptError, match=f"output {out} cannot be written: creating {out.parent} failed"):
        _make_dir(out.parent, out, parents=True)


def test_internal_error_exits_70_and_writes_nothing(tiny_folder, tmp_path, capsys, monkeypatch):
    """A bug in the middle of writing (after the library and weights are in the temporary folder)."""
    from llmopt.codegen import artifact_writer

    def broken(root):
        assert (root / "model.so").is_file() and any((root / "weights").iterdir())
        raise RuntimeError("a bug")
    monkeypatch.setattr(artifact_writer, "_hash_tree", broken)
    with pytest.raises(SystemExit) as exit_info:
        main(["build", str(tiny_folder), "-o", str(tmp_path / "out")])
    assert exit_info.value.code == INTERNAL_ERROR_EXIT
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err
    assert "error: internal error in llmopt (a bug)" in err
    assert_nothing_written(tmp_path / "out")


def test_not_an_artifact(tmp_path, capsys):
    err = run_cli(capsys, "run", str(tmp_path), "--prompt", "hi")
    assert str(tmp_path) in err
