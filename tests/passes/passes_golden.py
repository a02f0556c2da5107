"""Helpers for the pass tests: IR text in, golden IR text and interpreter results out."""

from __future__ import annotations

import difflib
import textwrap

import numpy as np

from llmopt.ir import Module, WeightStore, parse_module, print_module, run_module, verify_module
from llmopt.ir.printer import HEADER
from llmopt.passes import Pass, PassResult


def ir(body: str) -> str:
    """A module's text from the body of a test string (the header is added, indentation removed)."""
    return f"{HEADER}\n\n{textwrap.dedent(body).strip()}\n"


def random_store(seed: int = 0, **shapes: tuple[int, ...]) -> WeightStore:
    """A store of small random f32 arrays; ``a__b=(2, 3)`` names the weight ``a.b``."""
    rng = np.random.default_rng(seed)
    store = WeightStore()
    for key, shape in shapes.items():
        store.add_array(key.replace("__", "."), rng.standard_normal(shape).astype(np.float32))
    return store


def assert_same_text(got: str, want: str) -> None:
    """Equal IR text, or an assertion error showing the diff."""
    if got != want:
        diff = difflib.unified_diff(want.splitlines(), got.splitlines(), "expected", "got", lineterm="")
        raise AssertionError("IR text differs:\n" + "\n".join(diff))


def assert_round_trips(module: Module) -> None:
    assert parse_module(print_module(module), module.weights) == module


def check_pass(pass_: Pass, before: str, expected: str, weights: WeightStore,
               inputs: dict[str, dict[str, np.ndarray]], atol: float = 1e-6) -> PassResult:
    """Run ``pass_`` on ``before``: the result prints as ``expected``, verifies, round-trips, leaves
    its input untouched, and computes the same outputs as the input for each entry in ``inputs``."""
    module = parse_module(ir(before), weights)
    verify_module(module)
    assert_round_trips(module)
    result = pass_.apply(module)
    assert_same_text(print_module(result.module), ir(expected))
    verify_module(result.module)
    assert_round_trips(result.module)
    assert print_module(module) == print_module(parse_module(ir(before), weights)), "the pass changed its input"
    for entry, feed in inputs.items():
        want = run_module(module, entry, feed)
        got = run_module(result.module, entry, feed)
        assert want.keys() == got.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=0, err_msg=f"{entry}: {name}")
    return result


def without_memory(stats: dict) -> dict:
    """A calibrated pass's ``stats`` less its calibration memory figures (checked positive), which
    vary by machine."""
    assert stats["calibration_peak_mib"] > 0 and stats["calibration_rss_mib"] > 0
    return {k: v for k, v in stats.items() if k not in ("calibration_peak_mib", "calibration_rss_mib")}
