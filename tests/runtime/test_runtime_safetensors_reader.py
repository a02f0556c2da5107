"""The runtime's plain-read safetensors reader returns what the safetensors library wrote."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmopt.runtime.safetensors_reader import read_tensors


def test_reads_what_safetensors_wrote(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(7, dtype=np.int32),
               "c": rng.standard_normal((2, 2, 2)).astype(np.float16)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    got = dict(read_tensors(tmp_path / "w.safetensors", ["c", "a", "b"]))
    for name, array in tensors.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].dtype == array.dtype


def test_cut_short_file_is_an_error(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.ones((64, 64), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut short"):
        list(read_tensors(path, ["a"]))
