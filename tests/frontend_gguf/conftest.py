"""SmolLM2-135M-Instruct, imported once per session: from its GGUF, from the cached HF folder, in transformers."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def prompt() -> str:
    return PROMPT


@pytest.fixture(scope="session")
def smollm2_gguf():
    from llmopt.frontend.zoo import smollm2_gguf_path
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_folder():
    from llmopt.frontend.zoo import smollm2_hf_folder
    return smollm2_hf_folder()


@pytest.fixture(scope="session")
def smollm2_from_gguf(smollm2_gguf):
    from llmopt.frontend.gguf_file import load_gguf
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_from_folder(smollm2_folder):
    from llmopt.frontend.hf_folder import load_hf_folder
    return load_hf_folder(smollm2_folder)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_folder):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def prompt_ids(smollm2_folder) -> np.ndarray:
    """int32[1, 5]: the prompt as transformers' tokenizer of the cached folder encodes it."""
    import transformers
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_folder))
    return np.array([tokenizer(PROMPT, add_special_tokens=False)["input_ids"]], dtype=np.int32)
