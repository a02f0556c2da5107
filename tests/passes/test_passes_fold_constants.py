"""fold-constants: golden IR text, derived weights evaluated lazily and correctly, the size rule."""

import numpy as np

from llmopt.ir import WeightStore, parse_module, run_module
from llmopt.passes import FoldConstants
from llmopt.passes.fold_constants import merge_names
from passes_golden import assert_round_trips, check_pass, ir, random_store

BEFORE = """
func @f(%x: f32[4, 4]) {
  %a = weight @blk.a.weight : f32[2, 4]
  %b = weight @blk.b.weight : f32[2, 4]
  %c = concat(%a, %b) {axis=0} : f32[4, 4]  # from=blk by=fuse-linears
  %t = transpose(%c) {perm=(1, 0)} : f32[4, 4]  # from=blk
  %k = constant() {dtype='f32', value=2.0} : f32[]
  %k2 = mul(%k, %k) : f32[]  # from=blk.scale
  %s = mul(%t, %k2) : f32[4, 4]
  %col = weight @col : f32[4, 1]
  %row = weight @row : f32[1, 4]
  %big = add(%col, %row) : f32[4, 4]
  %y = matmul(%x, %s) : f32[4, 4]
  %z = add(%y, %big) : f32[4, 4]
  return y=%z
}
"""

EXPECTED = """
func @f(%x: f32[4, 4]) {
  %0 = weight @blk.a.weight : f32[2, 4]
  %1 = weight @blk.b.weight : f32[2, 4]
  %2 = weight @blk.a+b.weight : f32[4, 4]  # from=blk by=fold-constants
  %3 = weight @blk.a+b.weight.transpose : f32[4, 4]  # from=blk by=fold-constants
  %4 = constant() {dtype='f32', value=2.0} : f32[]
  %5 = constant() {dtype='f32', value=4.0} : f32[]  # from=blk.scale by=fold-constants
  %6 = weight @blk.a+b.weight.transpose.mul : f32[4, 4]  # by=fold-constants
  %7 = weight @col : f32[4, 1]
  %8 = weight @row : f32[1, 4]
  %9 = add(%7, %8) : f32[4, 4]
  %10 = matmul(%x, %6) : f32[4, 4]
  %11 = add(%10, %9) : f32[4, 4]
  return y=%11
}
"""


def counting_store(**shapes) -> tuple[WeightStore, dict[str, int]]:
    """A random store whose loads are counted per weight."""
    source, counts, store = random_store(**shapes), {}, WeightStore()
    for name in source:
        def load(name=name):
            counts[name] = counts.get(name, 0) + 1
            return source.get(name)
        store.add(name, source.type(name), load)
    return store, counts


def test_fold_constants_golden_and_lazy():
    weights, loads = counting_store(blk__a__weight=(2, 4), blk__b__weight=(2, 4), col=(4, 1), row=(1, 4))
    module = parse_module(ir(BEFORE), weights)
    result = FoldConstants().apply(module)
    assert loads == {}, "folding must not load weights"
    assert result.stats == {"folded": 4, "weights_added": 3}
    assert "blk.a+b.weight" not in weights, "the input's store must not change"

    check_pass(FoldConstants(), BEFORE, EXPECTED, weights, {"f": {"x": np.ones((4, 4), np.float32)}})
    store, a, b = result.module.weights, weights.get("blk.a.weight"), weights.get("blk.b.weight")
    np.testing.assert_array_equal(store.get("blk.a+b.weight.transpose.mul"), np.concatenate([a, b]).T * 4)
    assert store.get("blk.a+b.weight.transpose").flags.c_contiguous


def test_fold_constants_shares_weights_across_functions_and_keeps_names_unique():
    before = """
    func @prefill(%x: f32[4]) {
      %a = weight @m.q.weight : f32[2]
      %b = weight @m.k.weight : f32[2]
      %c = concat(%a, %b) {axis=0} : f32[4]
      %y = add(%x, %c) : f32[4]
      return y=%y
    }

    func @decode(%x: f32[4]) {
      %a = weight @m.q.weight : f32[2]
      %b = weight @m.k.weight : f32[2]
      %c = concat(%a, %b) {axis=0} : f32[4]
      %d = concat(%b, %a) {axis=0} : f32[4]
      %e = concat(%a, %b, %a) {axis=-1} : f32[6]
      %f = slice(%e) {axis=0, end=4, start=0} : f32[4]
      %s = add(%c, %d) : f32[4]
      %t = add(%s, %f) : f32[4]
      %y = add(%x, %t) : f32[4]
      return y=%y
    }
    """
    expected = """
    func @prefill(%x: f32[4]) {
      %0 = weight @m.q.weight : f32[2]
      %1 = weight @m.k.weight : f32[2]
      %2 = weight @m.q+k.weight : f32[4]  # by=fold-constants
      %3 = add(%x, %2) : f32[4]
      return y=%3
    }

    func @decode(%x: f32[4]) {
      %0 = weight @m.q.weight : f32[2]
      %1 = weight @m.k.weight : f32[2]
      %2 = weight @m.q+k.weight : f32[4]  # by=fold-constants
      %3 = weight @m.k+q.weight : f32[4]  # by=fold-constants
      %4 = weight @m.q+k+q.weight : f32[6]  # by=fold-constants
      %5 = weight @m.q+k+q.weight.slice : f32[4]  # by=fold-constants
      %6 = weight @m.q+k.weight.add : f32[4]  # by=fold-constants
      %7 = weight @m.q+k.weight.add.add : f32[4]  # by=fold-constants
      %8 = add(%x, %7) : f32[4]
      return y=%8
    }
    """
    weights = random_store(m__q__weight=(2,), m__k__weight=(2,))
    feed = {"x": np.ones(4, np.float32)}
    result = check_pass(FoldConstants(), before, expected, weights, {"prefill": feed, "decode": feed})
    assert result.stats == {"folded": 7, "weights_added": 6}


def test_fold_constants_gives_colliding_names_a_number():
    before = """
    func @f(%x: f32[2, 2]) {
      %a = weight @w : f32[2, 2]
      %b = neg(%a) : f32[2, 2]
      %c = exp(%a) : f32[2, 2]
      %d = neg(%c) : f32[2, 2]
      %e = add(%b, %d) : f32[2, 2]
      %y = add(%x, %e) : f32[2, 2]
      return y=%y
    }
    """
    weights = random_store(**{"w": (2, 2), "w__exp__neg": (1,)})
    module = FoldConstants().run(parse_module(ir(before), weights))
    assert_round_trips(module)
    names = [n.attr["name"] for n in module.functions["f"].nodes if n.op == "weight"]
    assert names == ["w", "w.neg", "w.exp", "w.exp.neg.2", "w.neg.add"]
    feed = {"x": np.zeros((2, 2), np.float32)}
    w = weights.get("w")
    np.testing.assert_allclose(run_module(module, "f", feed)["y"], -w - np.exp(w), rtol=1e-6)


def test_merge_names():
    assert merge_names(["a.b.q_proj.weight", "a.b.k_proj.weight"]) == "a.b.q_proj+k_proj.weight"
    assert merge_names(["w", "w"]) == "w"
    assert merge_names(["a.x", "b.x"]) == "a+b.x"
    assert merge_names(["p.a", "p.a.b"]) == "p.a+a.b"
