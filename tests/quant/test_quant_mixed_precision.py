"""Mixed-precision plans: exact bits per weight, optimal and monotone plans under a budget, clear
infeasibility, rules that any method applies as planned, and on the tiny Llama a plan that beats
uniform quantization at no more bits."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from llmopt.cli import main
from llmopt.compiler import BuildOptions, load, optimize
from llmopt.errors import LLMOptError, USER_ERROR_EXIT
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.interp import run_module
from llmopt.ir.quant_schemes import get_scheme
from llmopt.passes import PassManager, build_pipeline
from llmopt.passes.quant import QuantizeRTN
from llmopt.passes.quant.mixed_precision import (LayerSensitivity, QuantizeMixed, SensitivityTable, bits_per_weight,
                                                 choose_schemes, measure_sensitivity)
from llmopt.passes.quant.rewrite import LayerRules

TOKENS = np.random.default_rng(0).integers(3, 128, (2, 24)).astype(np.int32)
TINY_CANDIDATES = ("w8", "w4g32", "w4", "w3g32", "w2g32-asym")


@pytest.fixture(scope="module")
def fused(tiny_llama):
    return PassManager(build_pipeline("fuse-linears,fold-constants")).run(load_hf_folder(tiny_llama))


@pytest.fixture(scope="module")
def table(fused):
    return measure_sensitivity(fused, TOKENS, TINY_CANDIDATES)


def test_bits_per_weight_counts_what_is_stored(fused):
    assert bits_per_weight("w4g128", 4096) == 4.25
    assert bits_per_weight("w4g32-asym", 64) == 6.0  # 4 + a 32-bit scale and zero per 32 weights
    assert bits_per_weight("w3g64", 576) == (58 * 32 + 9 * 32) / 576  # 10 codes per word, 2 bits unused
    assert bits_per_weight("w8", 576) == 8 + 32 / 576
    quantized = QuantizeRTN(scheme="w3g32-asym", rules="lm_head=skip").run(fused)
    for name in fused.weights:
        parts = [f"{name}.w3g32-asym.{part}" for part in ("packed", "scales", "zeros")]
        if parts[0] in quantized.weights:
            n, k = fused.weights.type(name).shape
            stored = sum(np.prod(quantized.weights.type(part).shape) * 32 for part in parts)
            assert stored / (n * k) == bits_per_weight("w3g32-asym", k)


def random_table(seed: int, layers: int = 5) -> SensitivityTable:
    rng = np.random.default_rng(seed)
    shapes = [(64, 64), (96, 64), (64, 96), (32, 128), (128, 32), (64, 64)]
    made = []
    for index in range(layers):
        n, k = shapes[index % len(shapes)]
        names = [s for s in ("w8", "w4g32", "w4", "w3g32", "w2g32-asym") if rng.random() < 0.8] or ["w8"]
        relative = {s: float(rng.random() * 2.0 ** (-get_scheme(s).bits)) for s in names}  # fewer bits: more error
        made.append(LayerSensitivity(f"l{index}.weight", f"l{index}", n, k, relative, gain=float(rng.random() + 0.1)))
    return SensitivityTable(tuple(made))


def average_bits(table, assignment):
    return (sum(l.params * bits_per_weight(s, l.in_features) for l, s in zip(table.layers, assignment))
            / sum(l.params for l in table.layers))


@pytest.mark.parametrize("seed", range(4))
def test_plan_is_the_brute_force_optimum_within_the_budget(seed):
    table = random_table(seed)
    assignments = list(itertools.product(*(sorted(l.relative) for l in table.layers)))
    for budget in (3.4, 4.2, 4.6, 5.0, 5.7, 6.5, 8.1):
        feasible = [a for a in assignments if average_bits(table, a) <= budget + 1e-12]
        if not feasible:
            continue
        best = min(sum(l.errors[s] for l, s in zip(table.layers, a)) for a in feasible)
        plan = choose_schemes(table, budget)
        assert plan.bits_per_weight <= budget
        assert plan.bits_per_weight == pytest.approx(average_bits(table, [l.scheme for l in plan.layers]))
        assert plan.error == pytest.approx(best, rel=1e-12), (seed, budget)


def test_more_budget_never_increases_the_error():
    table = random_table(7, layers=9)
    cheapest = average_bits(table, [min(l.relative, key=l.bits) for l in table.layers])
    errors = [choose_schemes(table, budget).error for budget in np.arange(cheapest, 8.6, 0.05)]
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < errors[0]


def test_a_budget_below_the_cheapest_plan_is_a_clear_error():
    table = random_table(1)
    cheapest = average_bits(table, [min(l.relative, key=l.bits) for l in table.layers])
    assert choose_schemes(table, cheapest).bits_per_weight == pytest.approx(cheapest)
    with pytest.raises(LLMOptError, match="below the cheapest plan") as error:
        choose_schemes(table, cheapest - 0.01)
    assert f"{cheapest:.4f}" in str(error.value)


def test_measurement_ranks_schemes_and_skips_the_lm_head(fused, table):
    names = [layer.weight for layer in table.layers]
    assert len(names) == 8 and "lm_head.weight" not in names  # 2 blocks x (qkv, o, gate+up, down)
    assert names[0] == "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"
    for layer in table.layers:
        assert "w3g32" in layer.relative and ("w4" in layer.relative)
        assert layer.relative["w8"] < layer.relative["w4g32"] < layer.relative["w3g32"] < layer.relative["w2g32-asym"]
        assert layer.gain > 0
    # the relative error is ||X W^T - X Q(W)^T||^2 / ||X W^T||^2 over every calibration token
    first = table.layers[0]
    linear = next(n for n in fused.functions["prefill"].nodes if n.op == "linear")
    inputs = []
    for row in TOKENS:
        run_module(fused, "prefill", {"ids": row[None], "pos": np.arange(len(row), dtype=np.int32)},
                   on_node=lambda node, value: inputs.append(value[0]) if node.name == linear.inputs[0] else None)
    x, w = np.concatenate(inputs).astype(np.float64), fused.weights.get(first.weight)
    q = get_scheme("w4g32").dequantize(get_scheme("w4g32").quantize(w))
    expected = np.sum((x @ (w - q).T) ** 2) / np.sum((x @ w.T) ** 2)
    assert first.relative["w4g32"] == pytest.approx(expected, rel=1e-6)


def test_plan_rules_round_trip_and_rtn_applies_the_planned_schemes(fused, table):
    plan = choose_schemes(table, 4.6)
    schemes = {layer.weight: layer.scheme for layer in plan.layers}
    assert len(set(schemes.values())) > 1  # a real mix
    rules = plan.rules()
    assert rules.startswith("lm_head=skip;model.layers.0.self_attn.q_proj+k_proj+v_proj.weight=")
    parsed = LayerRules("w4g32", rules)
    assert all(parsed.scheme_for(name).name == scheme for name, scheme in schemes.items())
    assert parsed.scheme_for("lm_head", "lm_head.weight") is None

    quantized = QuantizeRTN(scheme="w8", rules=rules).run(fused)
    for func in quantized.functions.values():
        seen = {}
        for node in func.nodes:
            if node.op == "dequantize":
                packed = func.node_map()[node.inputs[0]].attr["name"]
                seen[packed.removesuffix(f".{node.attr['scheme']}.packed")] = node.attr["scheme"]
        assert seen == schemes, func.name


def logits_mse(reference, module):
    feed = {"ids": TOKENS[:1], "pos": np.arange(TOKENS.shape[1], dtype=np.int32)}
    return float(np.mean((run_module(module, "logits", feed)["logits"] - reference) ** 2))


def test_plan_beats_uniform_quantization_at_no_more_bits(fused, table):
    feed = {"ids": TOKENS[:1], "pos": np.arange(TOKENS.shape[1], dtype=np.int32)}
    reference = run_module(fused, "logits", feed)["logits"]
    for uniform, budget in (("w4", 5.0), ("w4g32", None), ("w3g32", None)):
        uniform_bits = average_bits(table, [uniform] * len(table.layers))
        plan = choose_schemes(table, budget or uniform_bits)  # None: the uniform scheme's own bits
        assert plan.bits_per_weight <= (budget or uniform_bits)
        planned = QuantizeRTN(scheme="w8", rules=plan.rules()).run(fused)
        uniform_module = QuantizeRTN(scheme=uniform).run(fused)
        print(f"uniform {uniform} ({uniform_bits:.3f} bits): logits MSE {logits_mse(reference, uniform_module):.3e}; "
              f"plan ({plan.bits_per_weight:.3f} bits): {logits_mse(reference, planned):.3e}")
        assert logits_mse(reference, planned) < logits_mse(reference, uniform_module)


def test_build_options_bits_budget_records_the_plan(tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 120 + 3}" for i in range(300)))
    options = BuildOptions(bits_budget=5.0, calibration=(("calibration", str(text)), ("samples", "2"),
                                                         ("seq_len", "16")))
    module = optimize(load(tiny_llama), options)
    plan = module.meta["quant_plan"]
    assert plan["budget_bits"] == 5.0 and plan["bits_per_weight"] <= 5.0 and plan["method"] == "quantize-rtn"
    assert len(plan["layers"]) == 8
    schemes = {node.attr["scheme"] for node in module.functions["prefill"].nodes if node.op == "dequantize"}
    assert schemes == {layer["scheme"] for layer in plan["layers"]}
    with pytest.raises(LLMOptError, match="cannot be combined"):
        optimize(load(tiny_llama), BuildOptions(bits_budget=5.0, quant_rules="lm_head=w8"))


def test_cli_build_with_bits_budget(tiny_llama, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 11) % 120 + 3}" for i in range(300)))
    out = tmp_path / "mixed"
    main(["build", str(tiny_llama), "--bits-budget", "4.5", "--calib", f"calibration={text}", "--calib", "samples=2",
          "--calib", "seq_len=16", "-o", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    plan = manifest["created_by"]["quant_plan"]
    assert manifest["created_by"]["options"]["bits_budget"] == 4.5
    assert plan["bits_per_weight"] <= 4.5 and "quantize-mixed" in manifest["pipeline"]
    assert "mixed-precision plan" in capsys.readouterr().err

    with pytest.raises(SystemExit) as done:
        main(["build", str(tiny_llama), "--bits-budget", "1.5", "-o", str(tmp_path / "too-small")])
    assert done.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    assert "below the cheapest plan" in err and "Traceback" not in err
    assert not (tmp_path / "too-small").exists()


def test_quantize_mixed_pass_plans_then_runs_its_method(fused):
    mixed = QuantizeMixed(method=QuantizeRTN(scheme="w8"), budget=6.0, candidates=",".join(TINY_CANDIDATES))
    result = mixed.apply_with_tokens(fused, TOKENS)
    assert result.stats["planned"] == 8 and result.stats["quantized"] == 24  # 8 linears x 3 entry points
    assert result.module.meta["quant_plan"]["bits_per_weight"] <= 6.0
