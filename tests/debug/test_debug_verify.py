"""--verify's interpreter check, and provenance through the default pipeline."""

from __future__ import annotations

import pytest

from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.instruments import InterpreterCheck, PassVerifyError, Verify

from debug_models import SwapGateUp


@pytest.fixture(scope="module")
def module(tiny_llama):
    return load_hf_folder(tiny_llama)


def test_interpreter_check_passes_a_correct_pipeline(module):
    PassManager(build_pipeline("default"), [Verify(), InterpreterCheck()]).run(module)


def test_interpreter_check_names_the_pass_that_changed_the_outputs(module):
    passes = build_pipeline("fuse-linears") + [SwapGateUp()] + build_pipeline("fold-constants,cse,dce")
    with pytest.raises(PassVerifyError, match=r"pass #2 'swap-gate-up' .*changed the outputs of @logits"):
        PassManager(passes, [InterpreterCheck()]).run(module)


def test_provenance_survives_the_default_pipeline(module):
    optimized = PassManager(build_pipeline("default")).run(module)
    made_by = {}
    for func in optimized.functions.values():
        for node in func.nodes:
            if node.op != "weight":
                assert node.source, f"%{node.name} = {node.op} lost its source"
                assert node.source.startswith(("model.", "lm_head")), node.source
            made_by.setdefault(node.created_by, set()).add(node.op)
    # the frontend's nodes say no pass; fusion made linears and slices; folding made stored weights
    assert made_by == {"": made_by[""], "fuse-linears": {"linear", "slice"}, "fold-constants": {"weight"}}
    fused = [n for n in optimized.functions["prefill"].nodes if n.created_by == "fuse-linears" and n.op == "linear"]
    assert sorted({n.source for n in fused}) == ["model.layers.0.mlp", "model.layers.0.self_attn",
                                                  "model.layers.1.mlp", "model.layers.1.self_attn"]
