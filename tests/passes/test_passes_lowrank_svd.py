"""lowrank-svd: the factors are the best rank-r approximation (Eckart-Young, against numpy's SVD);
ranks meet the parameter ratio and a layer stays dense when factors would not save weights; on a tiny
Llama each chosen linear becomes linear(linear(x, B), A) (interpreter vs torch with W = A B, lm_head
dense, provenance); rules; the pipeline spec and ``--lowrank`` option put it before quantization."""

import numpy as np
import pytest
import torch
import transformers

from llmopt.compiler import BuildOptions, BuildReport, optimize
from llmopt.errors import LLMOptError
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import run_module, verify_module
from llmopt.passes import PASSES, build_pipeline
from llmopt.passes.lowrank import (LowRankASVD, LowRankSVD, Target, break_even_rank, lowrank_pass, saves,
                                   truncated_svd, uniform_rank, uniform_ranks)
from prune_data import FEED, K, N, WEIGHT


def factors_of(module) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Source weight name -> (A, B), for every factorized weight the module's graphs read."""
    read = {n.attr["name"] for f in module.functions.values() for n in f.nodes if n.op == "weight"}
    found = {}
    for name in read:
        if name.endswith(".b") and "-r" in name:
            source = name.rsplit(".", 2)[0]
            found[source] = (module.weights.get(name[:-2] + ".a"), module.weights.get(name))
    return found


@pytest.mark.parametrize("rank", [1, 5, 20, 47])
def test_factors_are_the_best_rank_r_approximation(rank):
    a, b = truncated_svd(WEIGHT, rank)
    assert a.shape == (N, rank) and b.shape == (rank, K) and a.dtype == b.dtype == np.float32
    u, s, vh = np.linalg.svd(WEIGHT.astype(np.float64), full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]  # numpy's rank-r truncation
    np.testing.assert_allclose(a.astype(np.float64) @ b, best, atol=2e-5)
    error = np.linalg.norm(WEIGHT - a.astype(np.float64) @ b)
    assert error == pytest.approx(np.sqrt((s[rank:] ** 2).sum()), rel=1e-5)  # Eckart-Young: the dropped energy
    np.testing.assert_allclose(b.astype(np.float64) @ b.T, np.eye(rank), atol=1e-5)  # B = V_r^T: orthonormal rows


def test_ranks_meet_the_ratio_and_break_even():
    for n, k in ((48, 256), (64, 64), (96, 64), (576, 1536)):
        assert break_even_rank(n, k) * (n + k) < n * k <= (break_even_rank(n, k) + 1) * (n + k)
        for ratio in (0.1, 0.2, 0.5):
            rank = uniform_rank(n, k, ratio)
            kept = rank * (n + k)
            assert kept <= (1 - ratio) * n * k < kept + (n + k) and saves(n, k, rank)
    assert not saves(48, 256, 41) and saves(48, 256, 40) and not saves(48, 256, 0)
    assert uniform_ranks([Target("w", 64, 64, 0.0)]) == {"w": 32} and not saves(64, 64, 32)  # ratio 0: nothing saved


def test_a_layer_whose_factors_would_not_save_weights_stays_dense(tiny_llama):
    module = load_hf_folder(tiny_llama)
    # rank 30: q/o (64x64: break-even 31) and gate/up/down (96x64: 38) are factorized, k/v (32x64: 21) are not
    result = LowRankSVD(rank=30).apply(module)
    factorized = factors_of(result.module)
    assert len(factorized) == 10 and not any("k_proj" in n or "v_proj" in n for n in factorized)
    assert result.stats["kept_dense"] == 4 and result.stats["weights_factorized"] == 10
    readers = {n.inputs[1]: n for n in result.module.functions["prefill"].nodes if n.op == "linear"}
    weights = [n for n in result.module.functions["prefill"].nodes if n.op == "weight"]
    k_proj = {n.attr["name"] for n in weights if "k_proj" in n.attr["name"]}
    assert k_proj == {f"model.layers.{i}.self_attn.k_proj.weight" for i in range(2)}
    assert all(readers[n.name].op == "linear" for n in weights if "k_proj" in n.attr["name"])


@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_pass_on_tiny_llama_matches_torch_with_the_factor_product(tiny_llama, ratio):
    module = load_hf_folder(tiny_llama)
    result = LowRankSVD(ratio=ratio).apply(module)
    verify_module(result.module)
    factorized = factors_of(result.module)
    assert len(factorized) == 14 and not any("lm_head" in name for name in factorized)  # 7 linears per layer
    stats = result.stats
    assert stats["factorized"] == 42 and stats["weights_factorized"] == 14 and stats["kept_dense"] == 0  # 3 functions
    before = after = 0
    for name, (a, b) in factorized.items():
        original = module.weights.get(name)
        (n, k), rank = original.shape, a.shape[1]
        assert a.shape == (n, rank) and b.shape == (rank, k) and rank == uniform_rank(n, k, ratio)
        u, s, vh = np.linalg.svd(original.astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(a.astype(np.float64) @ b, (u[:, :rank] * s[:rank]) @ vh[:rank], atol=2e-5)
        before, after = before + n * k, after + rank * (n + k)
    assert (stats["params_before"], stats["params_after"]) == (before, after)
    assert ratio <= 1 - after / before < ratio + 0.04
    assert stats["reduction"] == pytest.approx(1 - after / before, abs=1e-6)

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    state = hf.state_dict()
    with torch.no_grad():
        for name, (a, b) in factorized.items():
            state[name].copy_(torch.from_numpy(a.astype(np.float64) @ b))
        want = hf(torch.from_numpy(FEED["ids"]).long()).logits.numpy()
    got = run_module(result.module, "logits", FEED)["logits"]
    dense = run_module(module, "logits", FEED)["logits"]
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-4, rtol=1e-4)
    assert np.abs(got - dense).max() > 1e-2  # the factorization did change the model

    func = result.module.functions["logits"]
    nodes = func.node_map()
    assert sum(n.op == "linear" for n in func.nodes) == 2 * 14 + 1  # every chosen linear is two, lm_head one
    for node in func.nodes:
        if node.op == "weight" and node.attr["name"].endswith(".a"):  # linear(linear(x, B), A)
            second = next(n for n in func.nodes if n.op == "linear" and n.inputs[1] == node.name)
            first = nodes[second.inputs[0]]
            assert first.op == "linear" and nodes[first.inputs[1]].attr["name"] == node.attr["name"][:-2] + ".b"
            for new in (node, second, first, nodes[first.inputs[1]]):  # provenance: the pass, the replaced linear
                assert new.created_by == "lowrank-svd" and new.source == second.source != ""
    heads = [n.attr["name"] for n in func.nodes if n.op == "weight" and "lm_head" in n.attr["name"]]
    assert heads == ["lm_head.weight"]


def test_rules_give_layers_their_own_ratio_or_keep_them_dense(tiny_llama):
    module = load_hf_folder(tiny_llama)
    result = LowRankSVD(ratio=0.2, rules="lm_head=skip;down_proj=skip;*layers.1.*=0.5").apply(module)
    factorized = factors_of(result.module)
    assert len(factorized) == 12 and not any("down_proj" in name for name in factorized)
    for name, (a, b) in factorized.items():
        n, k = module.weights.get(name).shape
        assert a.shape[1] == uniform_rank(n, k, 0.5 if ".layers.1." in name else 0.2)
    for bad in ("lm_head", "mlp=2:4", "mlp=1.5"):
        with pytest.raises(LLMOptError, match="lowrank-svd: r"):
            LowRankSVD(rules=bad)
    for options in ({"ratio": 1.0}, {"ratio": -0.1}, {"rank": -1}, {"allocation": "greedy"},
                    {"rank": 8, "allocation": "energy"}):
        with pytest.raises(LLMOptError):
            LowRankSVD(**options)


def test_pipeline_spec_and_lowrank_option_put_factorization_before_quantization(tiny_llama):
    assert {"lowrank-svd", "lowrank-asvd"} <= set(PASSES)
    [spec_pass] = build_pipeline("lowrank-asvd{ratio=0.3,allocation=energy,samples=8,damp=0.001}")
    assert spec_pass == LowRankASVD(ratio=0.3, allocation="energy", samples=8, damp=0.001)
    want = LowRankASVD(ratio=0.2, allocation="energy", samples=8)
    assert lowrank_pass("asvd:0.2:energy", (("samples", "8"),)) == want
    assert lowrank_pass("svd:0.25", (("samples", "8"),)) == LowRankSVD(ratio=0.25)
    for bad in ("svd", "pca:0.2", "svd:x", "svd:1.2", "asvd:0.2:greedy"):
        with pytest.raises(LLMOptError):
            lowrank_pass(bad)
    with pytest.raises(LLMOptError, match="calibration option"):
        lowrank_pass("asvd:0.2", (("tokens", "8"),))

    report = BuildReport()
    module = optimize(load_hf_folder(tiny_llama), BuildOptions(lowrank="svd:0.2", quant="w8"), report)
    names = [name for name, _ in report.pass_stats]
    assert names == ["fuse-linears", "fold-constants", "lowrank-svd", "quantize-rtn", "cse", "dce"]
    stats = dict(report.pass_stats)
    # fused q/k/v [128, 64] (rank 34), o [64, 64] (25), gate/up [192, 64] (38), down [64, 96] (30) per layer;
    # both factors of each quantized (the LM head stays float)
    assert stats["lowrank-svd"]["weights_factorized"] == 8 and stats["quantize-rtn"]["weights_quantized"] == 16
    read = {n.attr["name"] for n in module.functions["prefill"].nodes if n.op == "weight"}
    assert "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight.svd-r34.a.w8.packed" in read  # K = 25: A quantized
    assert "model.layers.0.mlp.down_proj.weight.svd-r30.b.w8.packed" in read
    assert not any(name.endswith((".a", ".b")) for name in read)
    got = run_module(module, "logits", FEED)["logits"]
    factorized_only = optimize(load_hf_folder(tiny_llama), BuildOptions(lowrank="svd:0.2"))
    want = run_module(factorized_only, "logits", FEED)["logits"]
    assert 0 < np.abs(got - want).max() < 2e-2  # w8 on top of the factors is a small change
