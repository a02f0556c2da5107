"""lowrank-asvd: the whitened factors are the rank-r W' of least output error ||(W - W') X^T|| (against a
direct reference from the QR factorization of X), beat plain SVD on correlated, anisotropic inputs
(also unseen ones); in a model each linear is factorized on the outputs of the already-factorized
layers; energy allocation meets the budget and takes the most valuable directions of all layers; a
weight calibration never reaches gets the plain truncated SVD."""

import numpy as np
import pytest

from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir import Module, run_module, verify_module
from llmopt.ir.weights import WeightStore
from llmopt.passes import PassManager, build_pipeline, rebuild
from llmopt.passes.lowrank import (LowRankASVD, LowRankSVD, Target, break_even_rank, energy_ranks, saves,
                                   second_moment, truncated_svd, uniform_ranks, whitened_singular_values,
                                   whitened_svd, whitening)
from prune_data import CALIBRATION, FEED, K, TOKENS, WEIGHT, output_error

X = np.concatenate(CALIBRATION).reshape(-1, K).astype(np.float64)  # the calibration inputs, one token a row


def reference_optimum(w: np.ndarray, x: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """argmin over rank-r W' of ||(W - W') X^T||, and that minimum: with X = Q R (QR), the error is
    ||(W - W') R^T||, so W' R^T is the rank-r truncation of W R^T (Eckart-Young)."""
    _, r = np.linalg.qr(x)
    u, s, vh = np.linalg.svd(w.astype(np.float64) @ r.T)
    best = np.linalg.solve(r, ((u[:, :rank] * s[:rank]) @ vh[:rank]).T).T  # (W' R^T) R^-T
    return best, float(np.sqrt((s[rank:] ** 2).sum()))


def calibration_error(w_approx: np.ndarray) -> float:
    return float(np.linalg.norm(X @ (WEIGHT.astype(np.float64) - w_approx).T))


@pytest.mark.parametrize("rank", [4, 16, 40])
def test_whitened_factors_reach_the_least_output_error(rank):
    lower = whitening(second_moment(CALIBRATION, K), damp=0.0)
    np.testing.assert_allclose(lower @ lower.T, X.T @ X / len(X), rtol=0, atol=1e-5)  # products in float32
    a, b = LowRankASVD(damp=0.0).factors(WEIGHT, CALIBRATION, rank)
    np.testing.assert_array_equal(a, whitened_svd(WEIGHT, lower, rank)[0])
    assert a.shape == (WEIGHT.shape[0], rank) and b.shape == (rank, K)
    got = a.astype(np.float64) @ b
    best, least = reference_optimum(WEIGHT, X, rank)
    assert calibration_error(got) == pytest.approx(least, rel=1e-4)
    np.testing.assert_allclose(got, best, atol=1e-4 * np.abs(best).max())
    s = whitened_singular_values(WEIGHT, lower)  # the error is sqrt(n * dropped whitened energy)
    assert least == pytest.approx(np.sqrt(len(X) * (s[rank:] ** 2).sum()), rel=1e-6)
    plain_a, plain_b = truncated_svd(WEIGHT, rank)
    plain = plain_a.astype(np.float64) @ plain_b
    assert calibration_error(got) < 0.95 * calibration_error(plain)
    assert output_error(got) < 0.95 * output_error(plain)  # also on inputs calibration did not see
    print(f"rank {rank}: output error asvd {output_error(got):.1f}, svd {output_error(plain):.1f} (held out)")


def test_damping_trades_a_little_calibration_error_for_conditioning():
    least = reference_optimum(WEIGHT, X, 16)[1]
    errors = []
    for damp in (0.0, 0.01, 0.1):
        a, b = LowRankASVD(damp=damp).factors(WEIGHT, CALIBRATION, 16)
        errors.append(calibration_error(a.astype(np.float64) @ b))
    plain_a, plain_b = truncated_svd(WEIGHT, 16)
    assert least == pytest.approx(errors[0], rel=1e-4)
    assert errors[0] < errors[1] < errors[2] < calibration_error(plain_a.astype(np.float64) @ plain_b)


def test_energy_allocation_meets_the_budget_with_the_most_valuable_directions():
    rng = np.random.default_rng(0)
    targets = [Target(f"w{i}", n, k, ratio) for i, (n, k, ratio) in
               enumerate([(48, 256, 0.2), (64, 64, 0.2), (96, 64, 0.5), (64, 96, 0.2), (128, 32, 0.3)])]
    spectra = {t.name: np.sort(rng.gamma(0.3 + i, size=min(t.n, t.k)) ** (2 + i))[::-1]
               for i, t in enumerate(targets)}
    ranks = energy_ranks(targets, spectra)
    budget = sum((1 - t.ratio) * t.params for t in targets)
    kept = sum(ranks[t.name] * (t.n + t.k) if saves(t.n, t.k, ranks[t.name]) else t.params for t in targets)
    assert budget - max(t.n + t.k for t in targets) < kept <= budget
    assert ranks != uniform_ranks(targets) and len(set(ranks.values())) >= 4  # ranks follow the spectra
    taken, left = [], []
    for t in targets:  # value of direction i: its share of the layer's energy per weight it costs
        if not saves(t.n, t.k, ranks[t.name]):
            continue
        energy = spectra[t.name] ** 2
        value = energy / energy.sum() / (t.n + t.k)
        taken += list(value[1:ranks[t.name]])
        left += list(value[ranks[t.name]:])
    assert min(taken) >= max(left)  # no direction left out is worth more than one taken

    flat = {t.name: np.ones(min(t.n, t.k)) for t in targets}  # flat spectra: directions worth 1/(rank (n + k))
    ranks = energy_ranks(targets, flat)
    assert all(ranks[t.name] <= break_even_rank(t.n, t.k) or ranks[t.name] == min(t.n, t.k) for t in targets)


def weight_inputs(module, tokens) -> dict[str, list[np.ndarray]]:
    """Each prefill linear's inputs on every row of ``tokens``, by the weight it reads, from the interpreter."""
    func = module.functions["prefill"]
    weight_of = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
    readers = {n.name: weight_of[n.inputs[1]] for n in func.nodes if n.op == "linear" and n.inputs[1] in weight_of}
    inputs_of = {n.name: n.inputs[0] for n in func.nodes if n.op == "linear"}
    wanted = {inputs_of[name]: weight for name, weight in readers.items()}
    seen: dict[str, list[np.ndarray]] = {}
    for row in tokens:
        run_module(module, "prefill", {"ids": row[None], "pos": np.arange(len(row), dtype=np.int32)},
                   on_node=lambda node, value: seen.setdefault(wanted[node.name], []).append(value)
                   if node.name in wanted else None)
    return seen


def test_asvd_calibrates_each_layer_on_the_already_factorized_layers(tiny_llama):
    """Each factorized weight's inputs in the factorized model (the interpreter's inputs of its ``B``
    linear) give the pass's factors again; the dense model's inputs do not (but for layer 0's q/k/v)."""
    module = PassManager(build_pipeline("default")).run(load_hf_folder(tiny_llama))  # fused q/k/v, gate/up
    result = LowRankASVD(ratio=0.3).apply_with_tokens(module, TOKENS)
    verify_module(result.module)
    assert result.stats["calibrated"] == 8 and result.stats["weights_factorized"] == 8
    factorized_inputs, dense_inputs = weight_inputs(result.module, TOKENS), weight_inputs(module, TOKENS)
    same = 0
    for name, inputs in factorized_inputs.items():
        if not name.endswith(".b"):
            continue
        source, rank = name.rsplit(".", 2)[0], int(name.rsplit("-r", 1)[1].split(".")[0])
        original = module.weights.get(source)
        got = result.module.weights.get(name[:-2] + ".a").astype(np.float64) @ result.module.weights.get(name)
        a, b = LowRankASVD().factors(original, inputs, rank)
        scale = np.abs(got).max()
        np.testing.assert_allclose(a.astype(np.float64) @ b, got, atol=1e-3 * scale)
        a, b = LowRankASVD().factors(original, dense_inputs[source], rank)
        same += np.abs(a.astype(np.float64) @ b - got).max() < 1e-3 * scale
    assert same == 1  # only q/k/v of layer 0, which reads the embeddings
    got = run_module(result.module, "logits", FEED)["logits"]
    plain = run_module(LowRankSVD(ratio=0.3).apply(module).module, "logits", FEED)["logits"]
    dense = run_module(module, "logits", FEED)["logits"]
    assert np.abs(got - dense).max() > 1e-3 and np.abs(got - plain).max() > 1e-3


def decode_reads_its_own_head(module):
    """``module`` with decode reading its LM head from a copy, ``decode_head.weight``, which prefill
    (the calibration stream) never reads."""
    store = WeightStore()
    for name in module.weights:
        entry = module.weights.entry(name)
        store.add(name, entry.type, entry.load, entry.origin)
    store.add("decode_head.weight", module.weights.type("lm_head.weight"), lambda: module.weights.get("lm_head.weight"))

    def replace(node, b, rename):
        if node.op == "weight" and node.attr["name"] == "lm_head.weight":
            return b.add("weight", type=node.type, name="decode_head.weight")
        return None

    return Module({**module.functions, "decode": rebuild(module.functions["decode"], replace, "test")}, store,
                  dict(module.meta))


def test_energy_allocation_in_a_model_and_weights_calibration_never_reached(tiny_llama):
    module = decode_reads_its_own_head(load_hf_folder(tiny_llama))
    result = LowRankASVD(ratio=0.3, allocation="energy", rules="").apply_with_tokens(module, TOKENS)
    verify_module(result.module)
    stats = result.stats
    ranks = {n.attr["name"].rsplit(".", 2)[0]: n.type.shape[0] for f in result.module.functions.values()
             for n in f.nodes if n.op == "weight" and n.attr["name"].endswith(".b")}
    assert "decode_head.weight" in ranks and stats["calibrated"] == len(ranks) - 1  # all but the decode-only head
    linears = {n.attr["name"] for f in module.functions.values() for n in f.nodes
               if n.op == "weight" and n.name in {m.inputs[1] for m in f.nodes if m.op == "linear"}}
    assert len(linears) == 16 and stats["params_before"] == sum(module.weights.get(name).size for name in linears)
    assert 0.3 <= stats["reduction"] < 0.31 and stats["kept_dense"] == 16 - len(ranks) > 0  # some are worth keeping
    assert len(set(ranks.values())) > 4
    rank = ranks["decode_head.weight"]
    a, b = truncated_svd(module.weights.get("lm_head.weight"), rank)  # no calibration inputs: plain SVD
    np.testing.assert_array_equal(result.module.weights.get(f"decode_head.weight.asvd-r{rank}.a"), a)
    np.testing.assert_array_equal(result.module.weights.get(f"decode_head.weight.asvd-r{rank}.b"), b)
