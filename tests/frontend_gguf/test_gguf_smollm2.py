"""SmolLM2-135M-Instruct's GGUF, read by llmopt, against the folder transformers converted from it."""

import json

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from llmopt.ir.interp import run_module


def _prefill_logits(module, ids: np.ndarray) -> np.ndarray:
    pos = np.arange(ids.shape[1], dtype=np.int32)
    return run_module(module, "logits", {"ids": ids, "pos": pos})["logits"]


def test_gguf_smollm2_spec(smollm2_from_gguf):
    spec = smollm2_from_gguf.meta["decoder"]
    assert (spec["num_layers"], spec["hidden_size"], spec["intermediate_size"]) == (30, 576, 1536)
    assert (spec["num_heads"], spec["num_kv_heads"], spec["head_dim"], spec["vocab_size"]) == (9, 3, 64, 49152)
    assert (spec["rope_theta"], spec["rms_norm_eps"], spec["rope_scaling"]) == (100000.0, 1e-5, {})
    assert spec["tie_word_embeddings"] and not spec["qkv_bias"]


def test_gguf_smollm2_spec_matches_transformers_config(smollm2_from_gguf, smollm2_from_folder):
    spec, expected = dict(smollm2_from_gguf.meta["decoder"]), dict(smollm2_from_folder.meta["decoder"])
    assert spec.pop("rms_norm_eps") == pytest.approx(expected.pop("rms_norm_eps"), rel=1e-7)  # float32 in the file
    assert spec == expected


def test_gguf_smollm2_weights_equal_transformers_dequantized(smollm2_from_gguf, smollm2_from_folder):
    """Q4_1 attention/MLP, the Q8_0 embedding, F32 norms: same values as transformers' GGUF reader."""
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.7.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        np.testing.assert_array_equal(smollm2_from_gguf.weights.get(name), smollm2_from_folder.weights.get(name),
                                      err_msg=name)


def test_gguf_smollm2_prefill_matches_hf_folder_import(smollm2_from_gguf, smollm2_from_folder, prompt_ids):
    got = _prefill_logits(smollm2_from_gguf, prompt_ids)
    want = _prefill_logits(smollm2_from_folder, prompt_ids)
    assert np.abs(got - want).max() <= 1e-4


def test_gguf_smollm2_interpreter_matches_transformers(smollm2_from_folder, smollm2_torch, prompt_ids):
    got = _prefill_logits(smollm2_from_folder, prompt_ids)
    with torch.no_grad():
        want = smollm2_torch(torch.from_numpy(prompt_ids.astype(np.int64))).logits.numpy()
    assert np.abs(got - want).max() <= 1e-3


def test_gguf_smollm2_tokenizer_encodes_like_transformers(smollm2_from_gguf, prompt, prompt_ids):
    info = smollm2_from_gguf.meta["tokenizer"]
    tokenizer = Tokenizer.from_file(info["file"])
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert ids == prompt_ids[0].tolist()
    assert len(ids) == 5 and tokenizer.decode(ids) == prompt
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1  # special tokens stay whole


def test_gguf_smollm2_tokenizer_meta(smollm2_from_gguf, smollm2_gguf, smollm2_folder):
    info = smollm2_from_gguf.meta["tokenizer"]
    template = gguf.GGUFReader(smollm2_gguf).get_field("tokenizer.chat_template").contents()
    assert (info["bos_token_id"], info["eos_token_ids"], info["add_bos"]) == (1, [2], False)
    assert info["chat_template"] == template
    assert json.loads((smollm2_folder / "tokenizer_config.json").read_text())["chat_template"] == template


def test_gguf_smollm2_transformers_greedy_says_paris(smollm2_torch, prompt_ids):
    """A sanity check of the cached conversion itself."""
    from transformers import AutoTokenizer
    ids = torch.from_numpy(prompt_ids.astype(np.int64))
    with torch.no_grad():
        out = smollm2_torch.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_torch.name_or_path)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
