"""Pruning, shared parts: masks (unstructured per row / per layer, N:M) against direct numpy
references, levels and rules, and every pruning pass on a tiny Llama (interpreter vs torch with the
pruned weights, lm_head dense, exact sparsity, provenance), rules and shapes N:M skips, and the
pipeline spec / ``--prune`` option placing pruning before quantization."""

import numpy as np
import pytest
import torch
import transformers

from llmopt.compiler import BuildOptions, BuildReport, optimize
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import run_module, verify_module
from llmopt.passes import PASSES, build_pipeline
from llmopt.passes.prune import (Level, PruneMagnitude, PruneRules, PruneSparseGPT, PruneWanda, keep_mask, nm_mask,
                                 pruning_pass, unstructured_mask)
from prune_data import FEED, K, N, TOKENS, pruned_weights

SCORES = np.random.default_rng(4).standard_normal((N, K))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_row_mask_drops_the_lowest_scores_of_each_row(sparsity):
    keep = unstructured_mask(SCORES, sparsity, "row")
    dropped = int(np.floor(sparsity * K + 1e-9))
    assert keep.shape == SCORES.shape and keep.dtype == bool
    assert ((~keep).sum(axis=1) == dropped).all()
    for row, kept in zip(SCORES, keep):  # reference: the row's dropped-th smallest score is the threshold
        threshold = np.sort(row)[dropped - 1] if dropped else -np.inf
        np.testing.assert_array_equal(kept, row > threshold)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_layer_mask_drops_the_lowest_scores_of_the_matrix(sparsity):
    keep = unstructured_mask(SCORES, sparsity, "layer")
    dropped = int(np.floor(sparsity * N * K))
    assert (~keep).sum() == dropped
    np.testing.assert_array_equal(keep, SCORES > np.sort(SCORES.reshape(-1))[dropped - 1])
    assert (~keep).sum(axis=1).std() > 0  # rows lose different numbers: the layer, not each row, is cut


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_mask_keeps_exactly_the_n_largest_of_every_m(n, m):
    keep = nm_mask(SCORES, n, m)
    groups, scores = keep.reshape(N, K // m, m), SCORES.reshape(N, K // m, m)
    assert (groups.sum(axis=-1) == n).all()
    kth_largest = np.sort(scores, axis=-1)[..., m - n]  # reference: the n largest of each group
    np.testing.assert_array_equal(groups, scores >= kth_largest[..., None])
    np.testing.assert_array_equal(keep_mask(SCORES, Level(n=n, m=m)), keep)


def test_ties_are_broken_by_position_so_sparsity_stays_exact():
    scores = np.zeros((3, 8))
    np.testing.assert_array_equal(unstructured_mask(scores, 0.5, "row"), np.tile([False] * 4 + [True] * 4, (3, 1)))
    np.testing.assert_array_equal(nm_mask(scores, 2, 4), np.tile([False, False, True, True] * 2, (3, 1)))
    assert (~unstructured_mask(scores, 0.5, "layer")).sum() == 12


def test_levels_and_rules_parse_and_reject_bad_input():
    assert Level.parse("0.5") == Level(sparsity=0.5) and Level.parse(" 2:4 ") == Level(n=2, m=4)
    assert Level.parse("2:4").tag == "2of4" and Level.parse("0.5").tag == "s0.5"
    for bad in ("1.0", "-0.1", "4:4", "0:4", "a:b", "half"):
        with pytest.raises(LLMOptError):
            Level.parse(bad)
    rules = PruneRules(Level(sparsity=0.5), "lm_head=skip;down_proj=2:4;*layers.1.*=0.3")
    assert rules.level_for("lm_head", "lm_head.weight") is None
    assert rules.level_for("model.layers.1.mlp.down_proj", "w") == Level(n=2, m=4)  # first match wins
    assert rules.level_for("model.layers.1.mlp.up_proj", "w") == Level(sparsity=0.3)
    assert rules.level_for("model.layers.0.mlp.up_proj", "w") == Level(sparsity=0.5)
    with pytest.raises(LLMOptError, match="pattern=level"):
        PruneMagnitude(rules="lm_head")
    with pytest.raises(LLMOptError, match="sparsity"):
        PruneWanda(sparsity=1.5)
    with pytest.raises(LLMOptError, match="scope"):
        PruneWanda(scope="column")


def run_pass(pass_, module):
    return pass_.apply_with_tokens(module, TOKENS) if hasattr(pass_, "apply_with_tokens") else pass_.apply(module)


@pytest.mark.parametrize("pass_", [PruneMagnitude(), PruneWanda(), PruneSparseGPT(), PruneSparseGPT(nm="2:4"),
                                   PruneWanda(nm="4:8")], ids=lambda p: f"{p.name}-{p.nm or p.sparsity}")
def test_pass_on_tiny_llama_matches_torch_with_the_pruned_weights(tiny_llama, pass_):
    module = load_hf_folder(tiny_llama)
    result = run_pass(pass_, module)
    verify_module(result.module)
    pruned = pruned_weights(result.module)
    assert len(pruned) == 14 and not any("lm_head" in name for name in pruned)  # 7 linears per layer
    stats = result.stats
    assert stats["pruned"] == 42 and stats["weights_pruned"] == 14 and stats["skipped_shape"] == 0
    assert stats["params"] == sum(w.size for w in pruned.values()) and stats["sparsity"] == pytest.approx(0.5, abs=1e-6)
    for name, weight in pruned.items():
        original = module.weights.get(name)
        assert (weight == 0).sum() == weight.size // 2
        if not isinstance(pass_, PruneSparseGPT):  # only SparseGPT moves the kept weights
            np.testing.assert_array_equal(weight[weight != 0], original[weight != 0])
    if pass_.nm:
        n, m = map(int, pass_.nm.split(":"))
        assert all(((w.reshape(w.shape[0], -1, m) != 0).sum(-1) == n).all() for w in pruned.values())

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, weight in pruned.items():
            state[name].copy_(torch.from_numpy(weight))
        want = hf(torch.from_numpy(FEED["ids"]).long()).logits.numpy()
    got = run_module(result.module, "logits", FEED)["logits"]
    dense = run_module(module, "logits", FEED)["logits"]
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-4, rtol=1e-4)
    assert np.abs(got - dense).max() > 1e-2  # pruning did change the model
    lm_head = [n for n in result.module.functions["logits"].nodes if n.op == "weight" and "lm_head" in n.attr["name"]]
    assert [n.attr["name"] for n in lm_head] == ["lm_head.weight"]
    func = result.module.functions["logits"]
    readers = {n.inputs[1]: n for n in func.nodes if n.op == "linear"}
    new_weights = [n for n in func.nodes if n.op == "weight" and ".pruned-" in n.attr["name"]]
    assert len(new_weights) == 14
    for node in new_weights:  # provenance: made by the pass, from the linear that reads it
        assert node.created_by == pass_.name and node.source == readers[node.name].source != ""


def test_rules_keep_layers_dense_and_nm_skips_shapes_it_does_not_divide(tiny_llama):
    module = load_hf_folder(tiny_llama)
    result = PruneMagnitude(rules="lm_head=skip;down_proj=skip;*layers.1.*=0.25").apply(module)
    pruned = pruned_weights(result.module)
    assert len(pruned) == 12 and not any("down_proj" in name for name in pruned)
    for name, weight in pruned.items():
        assert (weight == 0).mean() == pytest.approx(0.25 if ".layers.1." in name else 0.5, abs=1e-3)
    result = PruneMagnitude(nm="3:7").apply(module)  # 64 and 96 inputs: no multiple of 7
    assert result.stats["pruned"] == 0 and result.stats["skipped_shape"] == 42


def test_pipeline_spec_and_prune_option_put_pruning_before_quantization(tiny_llama):
    assert {"prune-magnitude", "prune-wanda", "prune-sparsegpt"} <= set(PASSES)
    [spec_pass] = build_pipeline("prune-sparsegpt{nm=2:4,samples=8,damp=0.05}")
    assert spec_pass == PruneSparseGPT(nm="2:4", samples=8, damp=0.05)
    assert pruning_pass("sparsegpt:2:4", (("samples", "8"),)) == PruneSparseGPT(nm="2:4", samples=8)
    assert pruning_pass("magnitude:0.5", (("samples", "8"),)) == PruneMagnitude(sparsity=0.5)
    for bad in ("wanda", "obs:0.5", "wanda:2", "wanda:2:2"):
        with pytest.raises(LLMOptError):
            pruning_pass(bad)
    with pytest.raises(LLMOptError, match="calibration option"):
        pruning_pass("wanda:0.5", (("tokens", "8"),))

    report = BuildReport()
    module = optimize(load_hf_folder(tiny_llama), BuildOptions(prune="magnitude:0.5", quant="w8"), report)
    names = [name for name, _ in report.pass_stats]
    assert names == ["fuse-linears", "fold-constants", "prune-magnitude", "quantize-rtn", "cse", "dce"]
    quantized = {n.attr["name"] for n in module.functions["prefill"].nodes if n.op == "weight"}
    assert any(".pruned-s0.5.w8." in name for name in quantized)
    got = run_module(module, "logits", FEED)["logits"]
    pruned_only = optimize(load_hf_folder(tiny_llama), BuildOptions(prune="magnitude:0.5"))
    want = run_module(pruned_only, "logits", FEED)["logits"]
    assert np.abs(got - want).max() < 2e-2  # w8 on top of the pruned weights is a small change
