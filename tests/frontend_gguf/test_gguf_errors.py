"""Bad GGUF inputs are ModelInputErrors that name the file and what is wrong with it."""

import gguf
import pytest
from gguf_tiny_models import tiny_model, write_gguf

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
