"""Bisection names the wrong pass slipped into a pipeline on a tiny Llama, and no pass in a correct one."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from debug_models import SwapGateUp
from llmopt.cli import cli
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import run_module
from llmopt.passes import PASSES, build_pipeline
from llmopt.passes.bisect import bisect_pipeline, example_inputs


@pytest.fixture(scope="module")
def module(tiny_llama):
    return load_hf_folder(tiny_llama)


def test_wrong_pass_really_changes_the_logits(module):
    inputs = example_inputs(module, "logits")
    want = run_module(module, "logits", inputs)["logits"]
    broken = module
    for pass_ in build_pipeline("fuse-linears") + [SwapGateUp()]:
        broken = pass_.run(broken)
    assert np.abs(run_module(broken, "logits", inputs)["logits"] - want).max() > 1e-2


@pytest.mark.parametrize("position", [1, 2, 4])
def test_bisect_names_the_wrong_pass(module, position):
    passes = build_pipeline("fuse-linears,fold-constants,cse,dce")
    passes.insert(position, SwapGateUp())
    result = bisect_pipeline(module, passes, example_inputs(module, "logits"), tolerance=1e-4)
    assert (result.culprit, result.index) == ("swap-gate-up", position + 1)
    assert result.diffs[position] <= 1e-4 < result.diffs[position + 1]
    assert f"pass #{position + 1} 'swap-gate-up' broke the outputs" in result.describe()


def test_correct_pipeline_has_no_culprit(module):
    passes = build_pipeline("default")
    result = bisect_pipeline(module, passes, example_inputs(module, "prefill"), tolerance=1e-4, entry="prefill")
    assert result.culprit is None and result.index is None
    assert result.diffs[len(passes)] <= 1e-4
    assert "no pass changes the outputs" in result.describe()


def test_cli_bisect(tiny_llama, monkeypatch):
    monkeypatch.setitem(PASSES, SwapGateUp.name, SwapGateUp)
    result = CliRunner().invoke(cli, ["ir", str(tiny_llama), "--pipeline", "fuse-linears,swap-gate-up,default",
                                      "--bisect", "--tolerance", "1e-4"])
    assert result.exit_code == 0, result.output
    assert "pass #2 'swap-gate-up' broke the outputs" in result.output
    result = CliRunner().invoke(cli, ["ir", str(tiny_llama), "--bisect"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("no pass changes the outputs by more than 0.0001")
