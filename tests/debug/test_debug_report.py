"""The per-layer error report ranks a deliberately lossy layer first, finds the first NaN, and
agrees with transformers on the errors it reports (tiny Llama)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from debug_models import SwapGateUp
from llmopt.cli import cli
from llmopt.frontend.hf_folder import load_hf_folder
from llmopt.ir.graph import Module
from llmopt.ir.weights import WeightStore
from llmopt.passes import PASSES, Pass, PassResult, build_pipeline
from llmopt.passes.report import layer_error_report, relative_error
from tiny_models import VOCAB, save_tiny

DOWN_1 = "model.layers.1.mlp.down_proj"
V_1 = "model.layers.1.self_attn.v_proj"


def quantize_2bit(weight: np.ndarray) -> np.ndarray:
    """Per-row symmetric 2-bit rounding onto {-1.5, -0.5, 0.5, 1.5} * scale."""
    scale = np.abs(weight).max(axis=1, keepdims=True) / 1.5
    return (np.clip(np.floor(weight / scale) + 0.5, -1.5, 1.5) * scale).astype(weight.dtype)


def poison(weight: np.ndarray) -> np.ndarray:
    weight = weight.copy()
    weight[3, 5] = np.nan
    return weight


def replace_weight(module: Module, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Module:
    """The module with weight ``name`` changed (same name, same graph), in a new store."""
    store = WeightStore()
    for key in module.weights:
        entry = module.weights.entry(key)
        store.add(key, entry.type, entry.load, entry.origin)
    store.add(name, module.weights.type(name), lambda: change(module.weights.get(name)), f"changed {name}")
    return Module(dict(module.functions), store, dict(module.meta))


@dataclass(frozen=True)
class QuantizeDownProj(Pass):
    """A LOSSY pass (for the tests): layer 1's MLP down_proj weight rounded to 2 bits."""

    name = "quantize-down-proj"
    weight: ClassVar[str] = DOWN_1 + ".weight"

    def apply(self, module: Module) -> PassResult:
        return PassResult(replace_weight(module, self.weight, quantize_2bit), {"quantized": 1})


@dataclass(frozen=True)
class PoisonWeight(Pass):
    """A WRONG pass (for the tests): one NaN in layer 1's v_proj weight."""

    name = "poison-weight"
    weight: ClassVar[str] = V_1 + ".weight"

    def apply(self, module: Module) -> PassResult:
        return PassResult(replace_weight(module, self.weight, poison), {"poisoned": 1})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    return folder, save_tiny("llama", folder)


@pytest.fixture(scope="module")
def module(tiny):
    return load_hf_folder(tiny[0])


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, VOCAB, 16).astype(np.int32)


def after(module: Module, passes) -> Module:
    for pass_ in passes:
        module = pass_.run(module)
    return module


def by_name(report) -> dict:
    return {row.name: row for row in report.rows}


def test_relative_error():
    assert relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(0.1)
    assert relative_error(np.zeros(2), np.zeros(2)) == 0.0
    assert relative_error(np.zeros(2), np.ones(2)) == np.inf
    assert np.isnan(relative_error(np.ones(2), np.array([1.0, np.nan])))


def test_default_pipeline_is_exact(module, ids):
    report = layer_error_report(module, after(module, build_pipeline("default")), ids)
    layers = [f"model.layers.{i}" for i in range(2)]
    linears = [f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]
    assert [r.name for r in report.rows if r.kind == "layer"] == sorted(layers, key=[r.name for r in report.rows].index)
    assert sorted(r.name for r in report.rows) == sorted(layers + linears)
    assert all(r.output_error <= 1e-5 for r in report.rows), report.render()
    # fused q/k/v and gate/up read a fused weight: no weight error; the others read their own
    assert {r.name for r in report.rows if r.weight_error is not None} == {
        n for n in linears if n.endswith(("o_proj", "down_proj", "lm_head"))}
    assert all(r.weight_error == 0.0 for r in report.rows if r.weight_error is not None)
    assert report.first_nonfinite is None and report.unmatched == ()
    assert "first NaN/Inf: none" in report.render()


def test_fused_projections_are_matched_by_their_slices(module, ids):
    """Swapping the gate and up slices of layer 0 shows on exactly those rows (and downstream)."""
    report = by_name(layer_error_report(module, after(module, build_pipeline("fuse-linears") + [SwapGateUp()]), ids))
    for role in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert report[f"model.layers.0.self_attn.{role}"].output_error <= 1e-6
    for role in ("gate_proj", "up_proj", "down_proj"):
        assert report[f"model.layers.0.mlp.{role}"].output_error > 0.1
    assert report["model.layers.0"].output_error > 0.01


def torch_errors(model, ids) -> dict[str, float]:
    """Relative errors of layer 1's output and its down_proj output, quantized vs not, by transformers."""
    layer = model.model.layers[1]
    outputs = {}

    def keep(name):
        return lambda mod, args, out: outputs.setdefault(name, []).append(
            (out[0] if isinstance(out, tuple) else out).detach().numpy().copy())

    hooks = [layer.register_forward_hook(keep("layer")), layer.mlp.down_proj.register_forward_hook(keep("down"))]
    original = layer.mlp.down_proj.weight.detach().clone()
    try:
        with torch.no_grad():
            model(torch.from_numpy(ids[None].astype(np.int64)))
            layer.mlp.down_proj.weight.copy_(torch.from_numpy(quantize_2bit(original.numpy())))
            model(torch.from_numpy(ids[None].astype(np.int64)))
    finally:
        with torch.no_grad():
            layer.mlp.down_proj.weight.copy_(original)
        for hook in hooks:
            hook.remove()
    errors = {name: relative_error(want, got) for name, (want, got) in outputs.items()}
    errors["weight"] = relative_error(original.numpy(), quantize_2bit(original.numpy()))
    return errors


def test_lossy_layer_ranks_first(tiny, module, ids):
    passes = [QuantizeDownProj()] + build_pipeline("default")
    report = layer_error_report(module, after(module, passes), ids)
    layers = [r for r in report.rows if r.kind == "layer"]
    linears = [r for r in report.rows if r.kind == "linear"]
    assert layers[0].name == "model.layers.1" and linears[0].name == DOWN_1, report.render()
    assert layers[1].output_error <= 1e-5  # layer 0 comes before the damage
    want = torch_errors(tiny[1], ids)
    rows = by_name(report)
    assert rows["model.layers.1"].output_error == pytest.approx(want["layer"], rel=1e-3)
    assert rows[DOWN_1].output_error == pytest.approx(want["down"], rel=1e-3)
    assert rows[DOWN_1].weight_error == pytest.approx(want["weight"], rel=1e-6)
    assert rows[DOWN_1].output_error > 0.05 and rows["lm_head"].weight_error == 0.0


@pytest.mark.parametrize("pipeline, source, op", [
    ("none", V_1, "linear"),
    ("default", "model.layers.1.self_attn", "linear"),  # the fused q/k/v linear reads the NaN
])
def test_first_nonfinite_names_the_poisoned_layer(module, ids, pipeline, source, op):
    report = layer_error_report(module, after(module, [PoisonWeight()] + build_pipeline(pipeline)), ids)
    first = report.first_nonfinite
    assert (first.source, first.op) == (source, op)
    assert len(first.weights) == 1 and "v_proj" in first.weights[0]
    linears = [r for r in report.rows if r.kind == "linear"]
    assert linears[0].name == V_1 and np.isnan(linears[0].output_error)
    assert by_name(report)["model.layers.0"].output_error <= 1e-5
    assert f"first NaN/Inf: %{first.node} = linear from {source}" in report.render()


def test_cli_report(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, QuantizeDownProj.name, QuantizeDownProj)
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(1).integers(0, VOCAB, 40)))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["ir", str(tiny[0]), "--pipeline", "quantize-down-proj,default", "--report",
                                      "--report-json", str(out), "--text", str(text), "--tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "@logits on 12 tokens" in result.output and "first NaN/Inf: none" in result.output
    printed = [line.split()[0] for line in result.output.splitlines() if line.startswith(("model.", "lm_head"))]
    data = json.loads(out.read_text())
    assert printed == [row["name"] for row in data["rows"]]
    linears = [row for row in data["rows"] if row["kind"] == "linear"]
    assert linears[0]["name"] == DOWN_1 and linears[0]["output_error"] > 0.05
    assert data["rows"][0]["name"] == "model.layers.1" and data["tokens"] == 12


def test_cli_report_needs_a_text(tiny, tmp_path):
    result = CliRunner().invoke(cli, ["ir", str(tiny[0]), "--report", "--text", str(tmp_path / "missing.txt")])
    assert result.exit_code != 0 and "does not exist" in str(result.exception)
