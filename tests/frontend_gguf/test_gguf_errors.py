"""Bad GGUF inputs are ModelInputErrors that name the file and what is wrong with it."""

import gguf
import numpy as np
import pytest
import torch
from gguf_tiny_models import llama_cpp_permute, tiny_model, write_gguf

from llmopt.errors import ModelInputError
from llmopt.frontend.gguf_file import load_gguf


def _error(path) -> str:
    with pytest.raises(ModelInputError) as info:
        load_gguf(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_gguf_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(4096))
    assert "not a GGUF file" in _error(path)


def test_gguf_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "not a GGUF file" in _error(path)


@pytest.mark.parametrize("kilobytes", [1, 64, 2048])
def test_gguf_truncated_copy_of_smollm2(tmp_path, smollm2_gguf, kilobytes):
    path = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as f:
        path.write_bytes(f.read(kilobytes * 1024))
    assert "cut short or corrupt" in _error(path)


def test_gguf_missing_file(tmp_path):
    assert "no such file" in _error(tmp_path / "absent.gguf")


def test_gguf_unknown_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert "architecture 'gpt2' is not supported" in _error(path)


def test_gguf_missing_tensor(tmp_path):
    path = write_gguf(tiny_model("llama"), tmp_path / "tiny.gguf", "llama", drop=("blk.1.ffn_up.weight",))
    assert "the tensor 'blk.1.ffn_up.weight' is missing" in _error(path)


def test_gguf_missing_metadata_key(tmp_path):
    path = write_gguf(tiny_model("llama"), tmp_path / "tiny.gguf", "llama", drop_keys=(gguf.Keys.LLM.BLOCK_COUNT,))
    assert "the metadata key 'llama.block_count' is missing" in _error(path)


def test_gguf_tensor_shape_disagreeing_with_metadata(tmp_path):
    model = tiny_model("llama")
    model.config.intermediate_size = 80  # metadata now says 80, the tensors hold 96
    path = write_gguf(model, tmp_path / "tiny.gguf", "llama")
    assert "tensor 'blk.0.ffn_gate.weight' has shape [96, 64], the metadata implies [80, 64]" in _error(path)


def _weight_error(path, name: str) -> str:
    """The error of reading weight ``name`` (a Hugging Face name) of the GGUF at ``path``."""
    store = load_gguf(path).weights
    with pytest.raises(ModelInputError) as info:
        store.get(name)
    assert str(path) in str(info.value)
    return str(info.value)


def test_gguf_tensor_with_nan_and_inf(tmp_path):
    """Named by its GGUF name, with the index as stored (llama.cpp's permuted Q rows, before llmopt undoes that)."""
    model = tiny_model("llama")
    heads = model.config.num_attention_heads
    with torch.no_grad():
        weight = model.model.layers[1].self_attn.q_proj.weight
        weight[9, 4] = float("inf")
        weight[40, 0] = float("nan")
    stored = llama_cpp_permute(weight.detach().numpy(), heads, heads)
    first = [int(i) for i in np.argwhere(~np.isfinite(stored))[0]]
    path = write_gguf(model, tmp_path / "tiny.gguf", "llama")
    err = _weight_error(path, "model.layers.1.self_attn.q_proj.weight")
    assert f"weight 'blk.1.attn_q.weight' holds 1 NaN and 1 Inf value(s) of 4096 (the first at index {first})" in err
    assert "The checkpoint is damaged" in err
    assert load_gguf(path).weights.get("model.layers.1.self_attn.k_proj.weight").shape == (32, 64)  # others read


def test_gguf_tensor_stored_as_integers(tmp_path, monkeypatch):
    add_tensor = gguf.GGUFWriter.add_tensor

    def as_int32(self, name, tensor, *args, **kwargs):
        return add_tensor(self, name, tensor.astype(np.int32) if name == "blk.0.ffn_up.weight" else tensor,
                          *args, **kwargs)
    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", as_int32)
    path = write_gguf(tiny_model("llama"), tmp_path / "tiny.gguf", "llama")
    assert "tensor 'blk.0.ffn_up.weight' is stored as I32, an integer type" in _error(path)
