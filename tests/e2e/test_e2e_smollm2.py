"""The real model: SmolLM2-135M compiled for this CPU against transformers fp32.

One artifact is built per session (the embedded default, through the GGUF-converted HF folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from click.testing import CliRunner

from llmopt.cli import cli
from llmopt.compiler import BuildOptions, build
from llmopt.frontend.zoo import smollm2_hf_folder
from llmopt.runtime import generate, load
from llmopt.runtime.perplexity import perplexity

PERSUASION = Path(__file__).resolve().parents[3] / "shared" / "data" / "austen" / "persuasion.txt"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hf_folder() -> Path:
    return smollm2_hf_folder()


@pytest.fixture(scope="module")
def reference(hf_folder):
    return transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def artifact(hf_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "artifact"
    build("smollm2", out, BuildOptions())
    return load(out)


def reference_logits(model, ids) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_prefill_and_16_decode_steps_match_transformers(artifact, reference):
    ids = artifact.tokenizer.encode(PROMPT)
    expected = reference_logits(reference, ids)
    np.testing.assert_allclose(artifact.forward_logits(np.array(ids)), expected, atol=1e-3, rtol=0)
    logits, cache = artifact.prefill(np.array(ids))
    np.testing.assert_allclose(logits, expected[-1], atol=1e-3, rtol=0)
    for _ in range(16):
        ids.append(int(np.argmax(logits)))
        logits, cache = artifact.decode(ids[-1], cache)
        np.testing.assert_allclose(logits, reference_logits(reference, ids)[-1], atol=1e-3, rtol=0)


def test_greedy_32_tokens_equal_transformers_generate(artifact, reference):
    ids = artifact.tokenizer.encode(PROMPT)
    ours = list(generate(artifact, ids, max_new_tokens=32, stop_ids=[]))
    with torch.inference_mode():
        theirs = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs
    assert artifact.tokenizer.decode(ours).startswith(" Paris")


def test_perplexity_equals_transformers_within_half_percent(artifact, reference):
    context, tokens = 256, 2048
    ids = artifact.tokenizer.encode(PERSUASION.read_text(encoding="utf-8"))
    ours = perplexity(artifact.forward_logits, ids, context, tokens)
    theirs = perplexity(lambda window: reference_logits(reference, window.tolist()), ids, context, tokens)
    assert (ours.context, ours.tokens, ours.scored) == (256, 2048, 8 * 255)
    assert abs(ours.perplexity / theirs.perplexity - 1) < 0.005, (ours, theirs)


def test_cli_eval_states_window_and_tokens(artifact, reference):
    result = CliRunner().invoke(cli, ["eval", str(artifact.path), "--text", str(PERSUASION), "--context", "128",
                                      "--tokens", "512"])
    assert result.exit_code == 0, result.output
    match = re.search(r"perplexity ([\d.]+) over 508 predicted tokens \(4 windows of 128 tokens, first 512 tokens",
                      result.output)
    assert match, result.output
    ids = artifact.tokenizer.encode(PERSUASION.read_text(encoding="utf-8"))
    theirs = perplexity(lambda window: reference_logits(reference, window.tolist()), ids, 128, 512)
    assert abs(float(match.group(1)) / theirs.perplexity - 1) < 0.005


def test_cli_run_prints_the_completion(artifact):
    result = CliRunner().invoke(cli, ["run", str(artifact.path), "--prompt", PROMPT, "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(PROMPT + " Paris")
