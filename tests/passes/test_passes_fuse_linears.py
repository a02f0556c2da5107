"""fuse-linears: golden IR text, counts of what fused, and unchanged logits on a tiny Llama."""

import numpy as np
import pytest
import torch
import transformers

from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import Module, cache_buffers, run_module
from llmopt.passes import FuseLinears, PassManager, PassResult, Verify, build_pipeline
from passes_golden import assert_round_trips, check_pass, random_store

BEFORE = """
func @f(%x: f32[1, seq, 4]) {
  %wq = weight @l.attn.q.weight : f32[4, 4]
  %q = linear(%x, %wq) : f32[1, seq, 4]  # from=l.attn.q
  %wk = weight @l.attn.k.weight : f32[2, 4]
  %k = linear(%x, %wk) : f32[1, seq, 2]  # from=l.attn.k
  %wg = weight @l.mlp.gate.weight : f32[3, 4]
  %bg = weight @l.mlp.gate.bias : f32[3]
  %g = linear(%x, %wg, %bg) : f32[1, seq, 3]  # from=l.mlp.gate
  %wv = weight @l.attn.v.weight : f32[2, 4]
  %v = linear(%x, %wv) : f32[1, seq, 2]  # from=l.attn.v
  %wu = weight @l.mlp.up.weight : f32[3, 4]
  %bu = weight @l.mlp.up.bias : f32[3]
  %u = linear(%x, %wu, %bu) : f32[1, seq, 3]  # from=l.mlp.up
  %kv = add(%k, %v) : f32[1, seq, 2]
  %gu = mul(%g, %u) : f32[1, seq, 3]
  %wd = weight @l.mlp.down.weight : f32[4, 3]
  %d = linear(%gu, %wd) : f32[1, seq, 4]  # from=l.mlp.down
  %y = add(%q, %d) : f32[1, seq, 4]
  return y=%y, kv=%kv
}
"""

EXPECTED = """
func @f(%x: f32[1, seq, 4]) {
  %0 = weight @l.attn.q.weight : f32[4, 4]
  %1 = weight @l.attn.k.weight : f32[2, 4]
  %2 = weight @l.attn.v.weight : f32[2, 4]
  %3 = concat(%0, %1, %2) {axis=0} : f32[8, 4]  # from=l.attn by=fuse-linears
  %4 = linear(%x, %3) : f32[1, seq, 8]  # from=l.attn by=fuse-linears
  %5 = slice(%4) {axis=-1, end=4, start=0} : f32[1, seq, 4]  # from=l.attn.q by=fuse-linears
  %6 = slice(%4) {axis=-1, end=6, start=4} : f32[1, seq, 2]  # from=l.attn.k by=fuse-linears
  %7 = slice(%4) {axis=-1, end=8, start=6} : f32[1, seq, 2]  # from=l.attn.v by=fuse-linears
  %8 = weight @l.mlp.gate.weight : f32[3, 4]
  %9 = weight @l.mlp.gate.bias : f32[3]
  %10 = weight @l.mlp.up.weight : f32[3, 4]
  %11 = weight @l.mlp.up.bias : f32[3]
  %12 = concat(%8, %10) {axis=0} : f32[6, 4]  # from=l.mlp by=fuse-linears
  %13 = concat(%9, %11) {axis=0} : f32[6]  # from=l.mlp by=fuse-linears
  %14 = linear(%x, %12, %13) : f32[1, seq, 6]  # from=l.mlp by=fuse-linears
  %15 = slice(%14) {axis=-1, end=3, start=0} : f32[1, seq, 3]  # from=l.mlp.gate by=fuse-linears
  %16 = slice(%14) {axis=-1, end=6, start=3} : f32[1, seq, 3]  # from=l.mlp.up by=fuse-linears
  %17 = add(%6, %7) : f32[1, seq, 2]
  %18 = mul(%15, %16) : f32[1, seq, 3]
  %19 = weight @l.mlp.down.weight : f32[4, 3]
  %20 = linear(%18, %19) : f32[1, seq, 4]  # from=l.mlp.down
  %21 = add(%5, %20) : f32[1, seq, 4]
  return y=%21, kv=%17
}
"""

AFTER_DEFAULT_PIPELINE = """
func @f(%x: f32[1, seq, 4]) {
  %0 = weight @l.attn.q+k+v.weight : f32[8, 4]  # from=l.attn by=fold-constants
  %1 = linear(%x, %0) : f32[1, seq, 8]  # from=l.attn by=fuse-linears
  %2 = slice(%1) {axis=-1, end=4, start=0} : f32[1, seq, 4]  # from=l.attn.q by=fuse-linears
  %3 = slice(%1) {axis=-1, end=6, start=4} : f32[1, seq, 2]  # from=l.attn.k by=fuse-linears
  %4 = slice(%1) {axis=-1, end=8, start=6} : f32[1, seq, 2]  # from=l.attn.v by=fuse-linears
  %5 = weight @l.mlp.gate+up.weight : f32[6, 4]  # from=l.mlp by=fold-constants
  %6 = weight @l.mlp.gate+up.bias : f32[6]  # from=l.mlp by=fold-constants
  %7 = linear(%x, %5, %6) : f32[1, seq, 6]  # from=l.mlp by=fuse-linears
  %8 = slice(%7) {axis=-1, end=3, start=0} : f32[1, seq, 3]  # from=l.mlp.gate by=fuse-linears
  %9 = slice(%7) {axis=-1, end=6, start=3} : f32[1, seq, 3]  # from=l.mlp.up by=fuse-linears
  %10 = add(%3, %4) : f32[1, seq, 2]
  %11 = mul(%8, %9) : f32[1, seq, 3]
  %12 = weight @l.mlp.down.weight : f32[4, 3]
  %13 = linear(%11, %12) : f32[1, seq, 4]  # from=l.mlp.down
  %14 = add(%2, %13) : f32[1, seq, 4]
  return y=%14, kv=%10
}
"""

WEIGHTS = dict(l__attn__q__weight=(4, 4), l__attn__k__weight=(2, 4), l__attn__v__weight=(2, 4),
               l__mlp__gate__weight=(3, 4), l__mlp__gate__bias=(3,), l__mlp__up__weight=(3, 4),
               l__mlp__up__bias=(3,), l__mlp__down__weight=(4, 3))
FEED = {"f": {"x": np.random.default_rng(1).standard_normal((1, 5, 4)).astype(np.float32)}}


def test_fuse_linears_golden():
    result = check_pass(FuseLinears(), BEFORE, EXPECTED, random_store(**WEIGHTS), FEED, atol=1e-5)
    assert result.stats == {"groups": 2, "linears_fused": 5}


def test_fuse_linears_min_group():
    result = check_pass(FuseLinears(min_group=3), BEFORE, ONLY_QKV_FUSED, random_store(**WEIGHTS),
                        FEED, atol=1e-5)
    assert result.stats == {"groups": 1, "linears_fused": 3}
    with pytest.raises(LLMOptError, match="min_group"):
        FuseLinears(min_group=1)


ONLY_QKV_FUSED = """
func @f(%x: f32[1, seq, 4]) {
  %0 = weight @l.attn.q.weight : f32[4, 4]
  %1 = weight @l.attn.k.weight : f32[2, 4]
  %2 = weight @l.attn.v.weight : f32[2, 4]
  %3 = concat(%0, %1, %2) {axis=0} : f32[8, 4]  # from=l.attn by=fuse-linears
  %4 = linear(%x, %3) : f32[1, seq, 8]  # from=l.attn by=fuse-linears
  %5 = slice(%4) {axis=-1, end=4, start=0} : f32[1, seq, 4]  # from=l.attn.q by=fuse-linears
  %6 = slice(%4) {axis=-1, end=6, start=4} : f32[1, seq, 2]  # from=l.attn.k by=fuse-linears
  %7 = slice(%4) {axis=-1, end=8, start=6} : f32[1, seq, 2]  # from=l.attn.v by=fuse-linears
  %8 = weight @l.mlp.gate.weight : f32[3, 4]
  %9 = weight @l.mlp.gate.bias : f32[3]
  %10 = linear(%x, %8, %9) : f32[1, seq, 3]  # from=l.mlp.gate
  %11 = weight @l.mlp.up.weight : f32[3, 4]
  %12 = weight @l.mlp.up.bias : f32[3]
  %13 = linear(%x, %11, %12) : f32[1, seq, 3]  # from=l.mlp.up
  %14 = add(%6, %7) : f32[1, seq, 2]
  %15 = mul(%10, %13) : f32[1, seq, 3]
  %16 = weight @l.mlp.down.weight : f32[4, 3]
  %17 = linear(%15, %16) : f32[1, seq, 4]  # from=l.mlp.down
  %18 = add(%5, %17) : f32[1, seq, 4]
  return y=%18, kv=%14
}
"""


class _DefaultPipeline:
    """The default pipeline, shaped like a pass for ``check_pass``."""

    def apply(self, module):
        return PassResult(PassManager(build_pipeline("default"), [Verify()]).run(module))


def test_default_pipeline_stores_fused_weights():
    weights = random_store(**WEIGHTS)
    module = check_pass(_DefaultPipeline(), BEFORE, AFTER_DEFAULT_PIPELINE, weights, FEED, atol=1e-5).module
    fused = module.weights.get("l.mlp.gate+up.bias")
    np.testing.assert_array_equal(fused, np.concatenate([weights.get("l.mlp.gate.bias"), weights.get("l.mlp.up.bias")]))


def test_fuse_linears_groups_only_what_it_can():
    before = """
    func @f(%x: f32[2, 4]) {
      %w = weight @w : f32[4, 4]
      %b = weight @b : f32[4]
      %a = linear(%x, %w) : f32[2, 4]
      %c = linear(%x, %a) : f32[2, 2]
      %d = linear(%x, %w, %b) : f32[2, 4]
      return a=%a, c=%c, d=%d
    }
    """
    expected = """
    func @f(%x: f32[2, 4]) {
      %0 = weight @w : f32[4, 4]
      %1 = weight @b : f32[4]
      %2 = linear(%x, %0) : f32[2, 4]
      %3 = linear(%x, %2) : f32[2, 2]
      %4 = linear(%x, %0, %1) : f32[2, 4]
      return a=%2, c=%3, d=%4
    }
    """
    feed = {"f": {"x": np.ones((2, 4), np.float32)}}
    result = check_pass(FuseLinears(), before, expected, random_store(w=(4, 4), b=(4,)), feed)
    assert result.stats == {"groups": 0, "linears_fused": 0}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return load_hf_folder(folder)


def test_fuse_linears_counts_on_tiny_llama(tiny_llama):
    expected_sources = ["model.layers.0.mlp", "model.layers.0.self_attn", "model.layers.1.mlp",
                        "model.layers.1.self_attn"]
    for func in tiny_llama.functions.values():
        fused, counts = FuseLinears().rewrite_function(func)
        assert_round_trips(Module({func.name: fused}, tiny_llama.weights))
        assert counts == {"groups": 4, "linears_fused": 10}, func.name
        made = [n for n in fused.nodes if n.op == "linear" and n.created_by == "fuse-linears"]
        assert sorted(n.source for n in made) == expected_sources
        assert sorted(n.type.shape[-1] for n in made) == [128, 128, 192, 192]  # q+k+v = 64+32+32, gate+up = 2*96


def test_default_pipeline_on_tiny_llama_keeps_logits(tiny_llama):
    manager = PassManager(build_pipeline("default"), [Verify()])
    optimized = manager.run(tiny_llama)
    # 4 groups of 10 linears in each of prefill, decode and logits
    assert manager.stats[0] == ("fuse-linears", {"groups": 12, "linears_fused": 30})
    for func in optimized.functions.values():
        assert sum(n.op == "linear" for n in func.nodes) == 9  # was 15: 2 layers x (qkv, o, gate+up, down) + head
    assert_round_trips(optimized)
    weights = optimized.weight_names()
    assert "model.layers.1.self_attn.q_proj+k_proj+v_proj.weight" in weights
    assert "model.layers.1.mlp.gate_proj+up_proj.weight" in weights
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name in weights)
    original = tiny_llama.weights
    np.testing.assert_array_equal(
        optimized.weights.get("model.layers.0.mlp.gate_proj+up_proj.weight"),
        np.concatenate([original.get("model.layers.0.mlp.gate_proj.weight"),
                        original.get("model.layers.0.mlp.up_proj.weight")]))

    rng = np.random.default_rng(0)
    prefill = {"ids": rng.integers(0, 100, (1, 6), dtype=np.int32), "pos": np.arange(6, dtype=np.int32)}
    cache = {name: value for name, value in run_module(tiny_llama, "prefill", prefill).items() if name != "logits"}
    decode = {"ids": np.array([[7]], np.int32), "pos": np.array([6], np.int32), **cache_buffers(cache, 8)}
    for entry, feed in (("prefill", prefill), ("decode", decode)):
        want = run_module(tiny_llama, entry, feed)
        got = run_module(optimized, entry, feed)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=f"{entry}: {name}")
