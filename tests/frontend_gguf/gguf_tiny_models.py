"""Tiny random Llama/Qwen2 checkpoints written both as a Hugging Face folder and as a GGUF file.

The GGUF is written the way llama.cpp's ``convert_hf_to_gguf.py`` writes it, independently of
llmopt's frontend: tensor names from the ``gguf`` library's own name map, Q/K rows permuted with
llama.cpp's ``LlamaModel.permute`` (copied below), Llama 3 RoPE scaling as a ``rope_freqs`` tensor
computed as llama.cpp computes it. Reading the GGUF back must give the Hugging Face model.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


def tiny_model(arch: str, tie: bool = False, rope: dict | None = None):
    """A seeded random tiny model of ``arch`` ("llama" or "qwen2")."""
    torch.manual_seed(0)
    sizes = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=tie, max_position_embeddings=16384, rms_norm_eps=1e-5)
    if arch == "llama":
        config = transformers.LlamaConfig(**sizes, rope_parameters=rope or {"rope_type": "default",
                                                                             "rope_theta": 10000.0})
        return transformers.LlamaForCausalLM(config).eval()
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes)).eval()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's Llama 3 ``rope_freqs`` factors (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context_len = rope["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(model, path: Path, arch: str, *, drop: tuple[str, ...] = (), drop_keys: tuple[str, ...] = (),
               rope: dict | None = None, vocabulary: bool = False) -> Path:
    """``model`` as llama.cpp would write it (all tensors F32), minus the tensors/keys in ``drop``/``drop_keys``;
    with ``vocabulary``, a byte-level BPE vocabulary ``t0 t1 ...`` (no merges), enough to build a tokenizer."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    writer = gguf.GGUFWriter(str(path), arch)
    metadata = {
        gguf.Keys.LLM.BLOCK_COUNT: ("uint32", cfg.num_hidden_layers),
        gguf.Keys.LLM.CONTEXT_LENGTH: ("uint32", cfg.max_position_embeddings),
        gguf.Keys.LLM.EMBEDDING_LENGTH: ("uint32", cfg.hidden_size),
        gguf.Keys.LLM.FEED_FORWARD_LENGTH: ("uint32", cfg.intermediate_size),
        gguf.Keys.Attention.HEAD_COUNT: ("uint32", heads),
        gguf.Keys.Attention.HEAD_COUNT_KV: ("uint32", kv_heads),
        gguf.Keys.Attention.LAYERNORM_RMS_EPS: ("float32", cfg.rms_norm_eps),
        gguf.Keys.Rope.FREQ_BASE: ("float32", (rope or {}).get("rope_theta", 10000.0)),
        gguf.Keys.Rope.DIMENSION_COUNT: ("uint32", head_dim),
    }
    for key, (kind, value) in metadata.items():
        if key not in drop_keys:
            getattr(writer, f"add_{kind}")(key.format(arch=arch), value)
    arch_enum = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        data = tensor.float().numpy()
        if arch == "llama" and base.endswith("q_proj"):
            data = llama_cpp_permute(data, heads, heads)
        elif arch == "llama" and base.endswith("k_proj"):
            data = llama_cpp_permute(data, heads, kv_heads)
        if gguf_name not in drop:
            writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    if vocabulary:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
        writer.add_token_merges([])
        writer.add_token_scores([0.0] * cfg.vocab_size)
        writer.add_token_types([1] * cfg.vocab_size)  # 1: normal
        writer.add_eos_token_id(2)
    if rope is not None and rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(rope, head_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
