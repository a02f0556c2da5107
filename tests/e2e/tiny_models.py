"""Tiny random-weight checkpoints of the Llama family, saved as Hugging Face folders for tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB = 128

TINY_CONFIGS = {
    # untied head, GQA 4:2, llama3 rope scaling
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # q/k/v biases, tied embeddings, GQA 6:2
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, rope_theta=1000000.0)),
}


def word_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (enough for the runtime's plumbing)."""
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))


def save_tiny(kind: str, folder: Path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A ``kind`` checkpoint in ``folder``; ``overrides`` change its config (e.g. num_hidden_layers)."""
    config_cls, model_cls, kwargs = TINY_CONFIGS[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():  # random biases and norms, so that those paths are really tested
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
    model.save_pretrained(folder)
    word_tokenizer(folder / "tokenizer.json")
    return model
