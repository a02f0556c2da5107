"""Compiled CPU artifacts of tiny Llama-family models against transformers fp32, prefill and decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmopt.compiler import BuildOptions, build
from llmopt.ir.interp import run_module
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.runtime import generate, load

from tiny_models import TINY_CONFIGS, save_tiny

PROMPT = [1, 17, 99, 3, 42, 7, 64, 5, 120, 33, 8]
DECODE_STEPS = 16


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save_tiny(request.param, folder / "hf")
    build(load_hf_folder(folder / "hf"), folder / "artifact", BuildOptions(pipeline="default"))
    return reference, folder


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_prefill_logits_match_transformers(tiny):
    reference, folder = tiny
    model = load(folder / "artifact")
    expected = reference_logits(reference, PROMPT)
    logits, _ = model.prefill(np.array(PROMPT))
    np.testing.assert_allclose(logits, expected[-1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(model.forward_logits(np.array(PROMPT)), expected, atol=1e-4, rtol=0)


def test_long_prompt_spanning_several_key_tiles(tiny):
    """150 positions: attention kernels walk keys in tiles, so cross several tile boundaries."""
    reference, folder = tiny
    ids = np.random.default_rng(0).integers(0, 128, 150).tolist()
    model = load(folder / "artifact")
    np.testing.assert_allclose(model.forward_logits(np.array(ids[:140])), reference_logits(reference, ids[:140]),
                               atol=1e-4, rtol=0)
    logits, cache = model.prefill(np.array(ids[:140]))
    for step in range(140, 150):
        logits, cache = model.decode(ids[step], cache)
    np.testing.assert_allclose(logits, reference_logits(reference, ids)[-1], atol=1e-4, rtol=0)


def test_decode_with_kv_cache_matches_transformers(tiny):
    reference, folder = tiny
    model = load(folder / "artifact")
    logits, cache = model.prefill(np.array(PROMPT))
    ids = list(PROMPT)
    for _ in range(DECODE_STEPS):
        ids.append(int(np.argmax(logits)))
        logits, cache = model.decode(ids[-1], cache)
        assert len(cache) == len(ids)
        np.testing.assert_allclose(logits, reference_logits(reference, ids)[-1], atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(tiny):
    reference, folder = tiny
    ours = list(generate(load(folder / "artifact"), PROMPT, max_new_tokens=DECODE_STEPS, stop_ids=[]))
    with torch.no_grad():
        theirs = reference.generate(torch.tensor([PROMPT]), max_new_tokens=DECODE_STEPS, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert ours == theirs


def test_interpreter_matches_artifact(tiny):
    _, folder = tiny
    module = load_hf_folder(folder / "hf")
    ids = np.array([PROMPT], dtype=np.int32)
    expected = run_module(module, "logits", {"ids": ids, "pos": np.arange(len(PROMPT), dtype=np.int32)})["logits"]
    logits = load(folder / "artifact").forward_logits(np.array(PROMPT))
    np.testing.assert_allclose(logits, expected[0], atol=1e-4, rtol=0)


def test_artifact_ir_dump_parses_back_to_the_built_module(tiny):
    """model.ir in the artifact is the final IR: it parses back to the optimized module."""
    from llmopt.compiler import BuildOptions as Options, optimize
    from llmopt.ir.parser import parse_module
    from llmopt.ir.printer import print_module

    _, folder = tiny
    built = optimize(load_hf_folder(folder / "hf"), Options())
    text = (folder / "artifact" / "model.ir").read_text()
    assert text == print_module(built)
    assert parse_module(text, built.weights) == built
