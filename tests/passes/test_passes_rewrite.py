"""rebuild: canonical names, provenance of substituted nodes, errors for dropped values still read."""

import pytest

from llmopt.ir import Module, WeightStore, parse_module, print_module
from llmopt.passes import DROP, RewriteError, rebuild
from passes_golden import assert_same_text, ir

TEXT = ir("""
func @f(%x: f32[4]) {
  %a = exp(%x) : f32[4]  # from=blk
  %b = neg(%a) : f32[4]  # from=blk.neg by=earlier
  return y=%b
}
""")


def func():
    return parse_module(TEXT).functions["f"]


def test_rebuild_renumbers_and_new_nodes_keep_the_replaced_source():
    def replace(node, b, rename):
        if node.op == "neg":
            return b.add("mul", b.add("constant", value=-1.0, dtype="f32"), rename[node.inputs[0]])
        return None
    new = Module({"f": rebuild(func(), replace, created_by="test-pass")}, WeightStore())
    assert_same_text(print_module(new), ir("""
        func @f(%x: f32[4]) {
          %0 = exp(%x) : f32[4]  # from=blk
          %1 = constant() {dtype='f32', value=-1.0} : f32[]  # from=blk.neg by=test-pass
          %2 = mul(%1, %0) : f32[4]  # from=blk.neg by=test-pass
          return y=%2
        }
    """))
    assert parse_module(print_module(new)) == new


def test_rebuild_refuses_to_drop_a_value_still_read():
    with pytest.raises(RewriteError, match="%b = neg reads %a, which the rewrite dropped"):
        rebuild(func(), lambda node, b, rename: DROP if node.op == "exp" else None, "test-pass")
    with pytest.raises(RewriteError, match="output y = %b was dropped"):
        rebuild(func(), lambda node, b, rename: DROP if node.op == "neg" else None, "test-pass")
