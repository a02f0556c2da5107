"""GGUF import of tiny random models written as llama.cpp writes them == import of their HF folders.

This checks the name table, the reversed ggml shapes, the undoing of llama.cpp's Q/K permutation,
biases, tied heads and Llama 3 RoPE scaling read back from ``rope_freqs``.
"""

import numpy as np
import pytest
from gguf_tiny_models import LLAMA3_ROPE, tiny_model, write_gguf

from llmopt.frontend.gguf_file import load_gguf
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module

CASES = {  # name -> (arch, tied, rope)
    "llama": ("llama", False, None),
    "llama-tied": ("llama", True, None),
    "llama3-rope": ("llama", False, LLAMA3_ROPE),
    "qwen2-bias": ("qwen2", False, None),
}


@pytest.fixture(params=sorted(CASES))
def both_imports(request, tmp_path):
    arch, tie, rope = CASES[request.param]
    model = tiny_model(arch, tie=tie, rope=rope)
    model.save_pretrained(tmp_path / "hf")
    return load_gguf(write_gguf(model, tmp_path / "tiny.gguf", arch, rope=rope)), load_hf_folder(tmp_path / "hf")


def test_gguf_spec_matches_hf_config(both_imports):
    from_gguf, from_hf = both_imports
    spec, expected = dict(from_gguf.meta["decoder"]), dict(from_hf.meta["decoder"])
    assert spec.pop("max_position_embeddings") == expected.pop("max_position_embeddings") == 16384
    assert spec == expected


def test_gguf_weights_equal_hf_weights(both_imports):
    from_gguf, from_hf = both_imports
    assert from_gguf.weights.names() == from_hf.weights.names()
    for name in from_hf.weights.names():
        np.testing.assert_array_equal(from_gguf.weights.get(name), from_hf.weights.get(name), err_msg=name)


def test_gguf_prefill_logits_equal_hf_prefill_logits(both_imports):
    from_gguf, from_hf = both_imports
    ids = np.array([[3, 17, 42, 5, 88, 1]], np.int32)
    pos = np.arange(6, dtype=np.int32) + 3000  # far positions, where Llama 3 scaling changes the rotation
    got = run_module(from_gguf, "logits", {"ids": ids, "pos": pos})["logits"]
    want = run_module(from_hf, "logits", {"ids": ids, "pos": pos})["logits"]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_gguf_without_vocabulary_has_no_tokenizer_file(both_imports):
    from_gguf, _ = both_imports
    assert from_gguf.meta["tokenizer"] == {"file": None, "chat_template": None, "bos_token_id": None,
                                           "eos_token_ids": [], "add_bos": False}
    assert from_gguf.meta["source"]["kind"] == "gguf"


def test_gguf_llama3_rope_attrs_come_from_rope_freqs(tmp_path):
    model = tiny_model("llama", rope=LLAMA3_ROPE)
    spec = load_gguf(write_gguf(model, tmp_path / "tiny.gguf", "llama", rope=LLAMA3_ROPE)).meta["decoder"]
    assert spec["rope_theta"] == 500000.0
    assert spec["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position": 8192}
