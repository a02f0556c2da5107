"""LLMOPT_DEBUG: the instruments each level adds, and what they print."""

from __future__ import annotations

import io

import pytest

from llmopt.errors import LLMOptError
from llmopt.ir import parse_module, print_module
from llmopt.passes import PassManager, Verify, build_pipeline
from llmopt.passes.instruments import PassLog, debug_instruments
from test_debug_diff import BEFORE

PIPELINE = ["fuse-linears", "fold-constants", "cse", "dce"]


def run_at(level) -> tuple[str, str]:
    stream = io.StringIO()
    result = PassManager(build_pipeline(PIPELINE), debug_instruments(level, stream)).run(parse_module(BEFORE))
    return stream.getvalue(), print_module(result)


def test_level_1_prints_each_pass_with_its_time():
    text, _ = run_at(1)
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"[llmopt] pass #{i} {name}" for i, name in
                                                       enumerate(PIPELINE, 1)]
    assert "fuse-linears: " in lines[0] and " s groups=1 linears_fused=2" in lines[0]
    assert "func @f" not in text


def test_level_2_prints_the_ir_after_each_pass():
    text, final = run_at(2)
    assert text.count("func @f") == len(PIPELINE) + 1
    assert text.endswith(f"[llmopt] IR after pass #4 dce:\n{final}")


def test_levels_and_env(monkeypatch):
    assert debug_instruments(0) == []
    monkeypatch.setenv("LLMOPT_DEBUG", "3")
    kinds = [type(i) for i in debug_instruments()]
    assert kinds == [PassLog, Verify]
    monkeypatch.setenv("LLMOPT_DEBUG", "1")
    assert [type(i) for i in debug_instruments()] == [PassLog]
    monkeypatch.delenv("LLMOPT_DEBUG")
    assert debug_instruments() == []
    monkeypatch.setenv("LLMOPT_DEBUG", "verbose")
    with pytest.raises(LLMOptError, match="LLMOPT_DEBUG='verbose' is not a debug level"):
        debug_instruments()


def test_default_stream_is_stderr(capsys):
    PassManager(build_pipeline(["dce"]), debug_instruments("1")).run(parse_module(BEFORE))
    assert "[llmopt] pass #1 dce: " in capsys.readouterr().err
