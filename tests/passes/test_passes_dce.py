"""dce: golden IR text, unchanged outputs, and what it must keep."""

import numpy as np
import pytest

from llmopt.ir import parse_module
from llmopt.passes import DeadCodeElimination
from passes_golden import assert_round_trips, check_pass, ir, random_store

X = {"x": np.arange(4, dtype=np.float32)}

BEFORE = """
func @f(%x: f32[4], %unused: f32[2]) {
  %a = weight @w : f32[4]
  %b = add(%x, %a) : f32[4]
  %c = mul(%x, %x) : f32[4]
  %d = exp(%c) : f32[4]  # from=blk.dead
  %e = neg(%b) : f32[4]  # from=blk by=someone
  return y=%e, x_again=%x
}

func @g(%x: f32[4]) {
  %a = weight @w : f32[4]
  %b = weight @w : f32[4]
  return y=%b
}
"""

EXPECTED = """
func @f(%x: f32[4], %unused: f32[2]) {
  %0 = weight @w : f32[4]
  %1 = add(%x, %0) : f32[4]
  %2 = neg(%1) : f32[4]  # from=blk by=someone
  return y=%2, x_again=%x
}

func @g(%x: f32[4]) {
  %0 = weight @w : f32[4]
  return y=%0
}
"""


def test_dce_removes_what_no_output_reads():
    feeds = {"f": {**X, "unused": np.zeros(2, np.float32)}, "g": X}
    result = check_pass(DeadCodeElimination(), BEFORE, EXPECTED, random_store(w=(4,)), feeds)
    assert result.stats == {"removed": 3}


def test_dce_keeps_transitive_inputs_of_outputs():
    chain = """
    func @f(%x: f32[4]) {
      %a = exp(%x) : f32[4]
      %b = neg(%a) : f32[4]
      %c = add(%a, %b) : f32[4]
      return y=%c
    }
    """
    expected = """
    func @f(%x: f32[4]) {
      %0 = exp(%x) : f32[4]
      %1 = neg(%0) : f32[4]
      %2 = add(%0, %1) : f32[4]
      return y=%2
    }
    """
    result = check_pass(DeadCodeElimination(), chain, expected, random_store(), {"f": X})
    assert result.stats == {"removed": 0}


@pytest.mark.parametrize("text", [BEFORE, EXPECTED])
def test_dce_is_idempotent(text):
    once = DeadCodeElimination().run(parse_module(ir(text), random_store(w=(4,))))
    assert_round_trips(once)
    assert DeadCodeElimination().run(once) == once
