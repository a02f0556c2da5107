"""cse: golden IR text, unchanged outputs, the first node's provenance kept."""

import numpy as np

from llmopt.passes import CommonSubexpressionElimination
from passes_golden import check_pass, random_store

BEFORE = """
func @f(%x: f32[2, 4]) {
  %w1 = weight @w : f32[4]
  %w2 = weight @w : f32[4]
  %v = weight @v : f32[4]
  %a = add(%x, %w1) : f32[2, 4]  # from=first by=someone
  %b = add(%x, %w2) : f32[2, 4]  # from=second
  %c = add(%x, %v) : f32[2, 4]
  %s1 = sum(%a) {axes=(1,)} : f32[2]
  %s2 = sum(%b) {axes=(1,)} : f32[2]
  %s3 = sum(%b) {axes=(1,), keepdims=True} : f32[2, 1]
  %s4 = sum(%c) {axes=(1,)} : f32[2]
  %y = add(%s1, %s2) : f32[2]
  %z = add(%y, %s4) : f32[2]
  return y=%z, k=%s3, also_y=%s2
}
"""

EXPECTED = """
func @f(%x: f32[2, 4]) {
  %0 = weight @w : f32[4]
  %1 = weight @v : f32[4]
  %2 = add(%x, %0) : f32[2, 4]  # from=first by=someone
  %3 = add(%x, %1) : f32[2, 4]
  %4 = sum(%2) {axes=(1,)} : f32[2]
  %5 = sum(%2) {axes=(1,), keepdims=True} : f32[2, 1]
  %6 = sum(%3) {axes=(1,)} : f32[2]
  %7 = add(%4, %4) : f32[2]
  %8 = add(%7, %6) : f32[2]
  return y=%8, k=%5, also_y=%4
}
"""


def test_cse_merges_identical_nodes_keeping_the_first():
    feeds = {"f": {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}}
    result = check_pass(CommonSubexpressionElimination(), BEFORE, EXPECTED, random_store(w=(4,), v=(4,)), feeds)
    assert result.stats == {"merged": 3}


def test_cse_does_not_merge_operands_in_another_order():
    before = """
    func @f(%x: f32[4]) {
      %a = weight @w : f32[4]
      %b = sub(%x, %a) : f32[4]
      %c = sub(%a, %x) : f32[4]
      %d = add(%b, %c) : f32[4]
      return y=%d
    }
    """
    expected = """
    func @f(%x: f32[4]) {
      %0 = weight @w : f32[4]
      %1 = sub(%x, %0) : f32[4]
      %2 = sub(%0, %x) : f32[4]
      %3 = add(%1, %2) : f32[4]
      return y=%3
    }
    """
    result = check_pass(CommonSubexpressionElimination(), before, expected, random_store(w=(4,)),
                        {"f": {"x": np.ones(4, np.float32)}})
    assert result.stats == {"merged": 0}
