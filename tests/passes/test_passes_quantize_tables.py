"""Quantized embedding tables: which scheme a table gets (a rule, else the linear it is tied to,
never the default), one ``dequantize`` of one set of codes serving a tied table and LM head, and
the interpreter computing the dequantized rows."""

import numpy as np
import pytest

from llmopt.ir import parse_module, print_module, run_module, verify_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.passes.quant import QuantizeAWQ, QuantizeGPTQ, QuantizeRTN
from llmopt.passes.quant.rewrite import LayerRules
from passes_golden import assert_round_trips, assert_same_text, ir, random_store

TIED = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %e = weight @embed.weight : f32[16, 32]
  %x = embedding(%ids, %e) : f32[1, seq, 32]  # from=embed
  %g = weight @norm.weight : f32[32]
  %h = rms_norm(%x, %g) {eps=1e-05} : f32[1, seq, 32]  # from=norm
  %w = weight @blk.up.weight : f32[24, 32]
  %y = linear(%h, %w) : f32[1, seq, 24]  # from=blk.up
  %z = linear(%h, %e) : f32[1, seq, 16]  # from=lm_head
  return z=%z, y=%y
}
"""

TIED_W4G8 = """
func @prefill(%ids: i32[1, seq], %pos: i32[seq]) {
  %0 = weight @embed.weight : f32[16, 32]
  %1 = weight @embed.weight.w4g8.packed : u32[16, 4]  # from=embed by=quantize-rtn
  %2 = weight @embed.weight.w4g8.scales : f32[16, 4]  # from=embed by=quantize-rtn
  %3 = dequantize(%1, %2) {in_features=32, out_features=16, scheme='w4g8'} : f32[16, 32]  # from=embed by=quantize-rtn
  %4 = embedding(%ids, %3) : f32[1, seq, 32]  # from=embed
  %5 = weight @norm.weight : f32[32]
  %6 = rms_norm(%4, %5) {eps=1e-05} : f32[1, seq, 32]  # from=norm
  %7 = weight @blk.up.weight : f32[24, 32]
  %8 = weight @blk.up.weight.w4g8.packed : u32[24, 4]  # from=blk.up by=quantize-rtn
  %9 = weight @blk.up.weight.w4g8.scales : f32[24, 4]  # from=blk.up by=quantize-rtn
  %10 = dequantize(%8, %9) {in_features=32, out_features=24, scheme='w4g8'} : f32[24, 32]  # from=blk.up by=quantize-rtn
  %11 = linear(%6, %10) : f32[1, seq, 24]  # from=blk.up
  %12 = linear(%6, %3) : f32[1, seq, 16]  # from=lm_head
  return z=%12, y=%11
}
"""

IDS = np.array([[0, 5, 15, 5, 9, 2, 11]], np.int32)
FEED = {"ids": IDS, "pos": np.arange(IDS.shape[1], dtype=np.int32)}


def tied_module(outliers: bool = False):
    """TIED with random weights; ``outliers``: two norm weights (the head's input channels) 50x larger."""
    store = random_store(embed__weight=(16, 32), blk__up__weight=(24, 32))
    norm = np.random.default_rng(3).standard_normal(32).astype(np.float32)
    if outliers:
        norm[[3, 17]] *= 50
    store.add_array("norm.weight", norm)
    return parse_module(ir(TIED), store)


def rtn(module, name: str, scheme: str = "w4g8") -> np.ndarray:
    """The round-to-nearest dequantized weight ``name`` of ``module``."""
    return get_scheme(scheme).dequantize(get_scheme(scheme).quantize(module.weights.get(name)))


def numpy_forward(module, table: np.ndarray, head: np.ndarray, up: np.ndarray) -> dict[str, np.ndarray]:
    x = table[IDS]
    g = module.weights.get("norm.weight")
    h = g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)
    return {"z": h @ head.T, "y": h @ up.T}


def embedding_input(module, function: str = "prefill"):
    nodes = module.functions[function].node_map()
    (embedding,) = [n for n in nodes.values() if n.op == "embedding"]
    return nodes[embedding.inputs[1]]


def test_table_schemes_come_from_a_rule_or_the_tie_never_the_default():
    rules = LayerRules("w4g32", "lm_head=skip")
    names = ("model.embed_tokens", "model.embed_tokens.weight")
    assert rules.scheme_for(*names).name == "w4g32"  # a linear with these names would get the default
    assert rules.table_scheme_for(*names) is None
    assert rules.table_scheme_for(*names, tied=get_scheme("w8")).name == "w8"
    assert LayerRules("w4g32", "embed_tokens=w4g32").table_scheme_for(*names).name == "w4g32"
    assert LayerRules("w4g32", "*embed*=nf4g64").table_scheme_for(*names, tied=get_scheme("w8")).name == "nf4g64"
    assert LayerRules("w4g32", "embed_tokens=skip").table_scheme_for(*names, tied=get_scheme("w8")) is None
    assert LayerRules("w4g32", "lm_head=w8;embed_tokens=skip").rule_for("lm_head", names[1]) == "w8"


def test_a_tied_table_reads_the_lm_head_dequantize():
    module = tied_module()
    result = QuantizeRTN(scheme="w4g8", rules="lm_head=w4g8").apply(module)
    assert_same_text(print_module(result.module), ir(TIED_W4G8))
    verify_module(result.module)
    assert_round_trips(result.module)
    assert result.stats == {"quantized": 2, "skipped_shape": 0, "tables_quantized": 1, "weights_quantized": 2}
    table = rtn(module, "embed.weight")
    want = numpy_forward(module, table, table, rtn(module, "blk.up.weight"))
    got = run_module(result.module, "prefill", FEED)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * np.abs(want[name]).max())


def test_default_rules_leave_tables_float():
    module = tied_module()
    result = QuantizeRTN(scheme="w4g8").apply(module)  # lm_head=skip: the tied head stays float, so does the table
    assert "tables_quantized" not in result.stats
    assert embedding_input(result.module).attr == {"name": "embed.weight"}
    untied = parse_module(ir(TIED.replace("%z = linear(%h, %e)", "%z = linear(%h, %w2)").replace(
        "  %x = embedding", "  %w2 = weight @lm_head.weight : f32[16, 32]\n  %x = embedding")),
        random_store(embed__weight=(16, 32), norm__weight=(32,), blk__up__weight=(24, 32), lm_head__weight=(16, 32)))
    result = QuantizeRTN(scheme="w4g8", rules="").apply(untied)  # the head quantized, not tied to the table
    assert result.stats["quantized"] == 2 and "tables_quantized" not in result.stats
    assert embedding_input(result.module).attr == {"name": "embed.weight"}
    result = QuantizeRTN(scheme="w4g8", rules="embed=w8").apply(untied)  # a rule reaches the table
    assert result.stats["tables_quantized"] == 1
    table = embedding_input(result.module)
    assert table.op == "dequantize" and table.attr["scheme"] == "w8"
    want = numpy_forward(untied, rtn(untied, "embed.weight", "w8"), rtn(untied, "lm_head.weight"),
                         rtn(untied, "blk.up.weight"))
    got = run_module(result.module, "prefill", FEED)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * np.abs(want[name]).max())


@pytest.mark.parametrize("rules, table_scheme, weights", [
    ("lm_head=w4g8;embed=skip", None, 2),  # the rule wins over the tie: the table stays float
    ("lm_head=w4g8;embed=w8", "w8", 3),  # its own scheme: a second set of codes for the table
])
def test_rules_override_the_tie(rules, table_scheme, weights):
    module = tied_module()
    result = QuantizeRTN(scheme="w4g8", rules=rules).apply(module)
    table = embedding_input(result.module)
    assert (table.attr.get("scheme") if table.op == "dequantize" else None) == table_scheme
    assert result.stats["weights_quantized"] == weights and result.stats["quantized"] == 2
    head = rtn(module, "embed.weight")
    table = module.weights.get("embed.weight") if table_scheme is None else rtn(module, "embed.weight", table_scheme)
    want = numpy_forward(module, table, head, rtn(module, "blk.up.weight"))
    got = run_module(result.module, "prefill", FEED)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5 * np.abs(want[name]).max())


TOKENS = np.random.default_rng(1).integers(0, 16, (4, 16)).astype(np.int32)


def test_gptq_shares_its_lm_head_codes_with_the_tied_table():
    module = tied_module()
    result = QuantizeGPTQ(scheme="w4g8", rules="lm_head=w4g8").apply_with_tokens(module, TOKENS)
    func = result.module.functions["prefill"]
    (head,) = [n for n in func.nodes if n.op == "linear" and n.source == "lm_head"]
    assert embedding_input(result.module).name == head.inputs[1]  # one dequantize node, one set of codes
    assert result.stats["tables_quantized"] == 1 and result.stats["calibrated"] == 2


def test_awq_gives_an_untied_table_codes_of_its_own_weight():
    """AWQ rescales the head's input, so the head reads W * s: a rule quantizing the table gets
    round-to-nearest codes of W itself, not the head's codes of W * s."""
    module = tied_module(outliers=True)  # outlier input channels of the head: AWQ picks s != 1
    result = QuantizeAWQ(scheme="w4g8", rules="lm_head=w4g8;embed=w4g8").apply_with_tokens(module, TOKENS)
    func = result.module.functions["prefill"]
    nodes = func.node_map()
    (head,) = [n for n in func.nodes if n.op == "linear" and n.source == "lm_head"]
    assert nodes[nodes[head.inputs[1]].inputs[0]].attr["name"] == "embed.weight.smoothquant.w4g8.packed"
    table = embedding_input(result.module)
    parts = [result.module.weights.get(nodes[v].attr["name"]) for v in table.inputs]
    assert [nodes[v].attr["name"] for v in table.inputs] == ["embed.weight.w4g8.packed", "embed.weight.w4g8.scales"]
    np.testing.assert_array_equal(get_scheme("w4g8").dequantize_packed(*parts, None, 32), rtn(module, "embed.weight"))
