"""Mixed-precision quantization plans: measure how much each linear suffers under each candidate
scheme, then choose one scheme per linear that meets an average bits-per-weight budget at the
least predicted loss (what ExLlamaV2's measurement pass and llama.cpp's ``--target-bpw`` do).

Measure (``measure_sensitivity``): the calibration set streams through the float model
(``stream_linears``); at each linear reading a stored weight ``W[N, K]`` with inputs ``X``, a
scheme's relative output error is ``||X W^T - X Q(W)^T||^2 / ||X W^T||^2 = tr(D H D^T) /
tr(W H W^T)`` with ``D = W - Q(W)`` (round-to-nearest) and ``H = X^T X`` summed over every
calibration token. Layers with equal relative errors differ widely in how much they move the
model's output (on SmolLM2 the KL per unit of relative error spans 50x: the first and last
``down_proj`` matter most, middle ``o_proj``s least), so, as ExLlamaV2 measures each layer's
effect on the output, each layer is also probed: the ``logits`` entry runs with only that layer
quantized with the probe scheme (``w3g64``), and the mean KL(float || probed) of the next-token
distributions over its relative error is the layer's ``gain``. A layer's predicted cost of a
scheme is gain x relative error, the KL it adds to second order, and costs of different layers
add. Probing runs the model once per linear (on ``probe_samples`` windows); ``probe=None`` ranks
layers by relative error alone, in one streaming run.

Choose (``choose_schemes``): minimize the summed error subject to ``sum(params_i * bpw_i) /
sum(params_i) <= budget`` over the planned linears, a multiple-choice knapsack solved exactly by
dynamic programming over the layers' costs in stored bits (divided by their greatest common
divisor; when that leaves too many states, costs are rounded up onto a coarser grid, so the budget
still holds). The bits per weight of a scheme (``bits_per_weight``) count what is stored:
``(packed_width * 32 + groups * 32 * (1 + has_zeros)) / K``, u32 code words plus f32 scales and
zero points. Linears matching ``keep_float`` (default: the LM head) stay float, are not measured
and do not count towards the budget.

The plan is ``LayerRules`` text, one rule per weight after ``lm_head=skip``
(``lm_head=skip;model.layers.3.mlp.down_proj.weight=w3g64;...``), so any method applies it:
``BuildOptions(quant="gptq:w4g128", quant_rules=plan.rules())``. The pass ``quantize-mixed``
measures, plans and then runs a quantization pass with the plan's rules, on the graph the
quantization pass sees; the plan goes into ``module.meta["quant_plan"]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Module, Node
from ...ir.interp import run
from ...ir.quant_schemes import Scheme, get_scheme
from ..base import Pass, PassResult
from .calibration import DEFAULT_CALIBRATION_TEXT, calibration_tokens, stream_linears
from .rewrite import LayerRules, linear_weights
from .rtn import QuantizeRTN

DEFAULT_CANDIDATES = ("w8", "w6g64", "w5g64", "w4g32", "w4g64", "w4g128", "w3g64", "w3g128", "w2g64-asym")
KEEP_FLOAT = ("lm_head",)
PROBE = "w3g64"  # the scheme a layer is quantized with to measure its effect on the output
MAX_STATES = 1 << 18  # budget grid points of the dynamic program


def bits_per_weight(scheme: Scheme | str, in_features: int) -> float:
    """Stored bits per weight of ``scheme`` on rows of ``in_features``: u32 code words plus one
    f32 scale (and zero point, asymmetric schemes) per group."""
    return _row_bits(get_scheme(scheme) if isinstance(scheme, str) else scheme, in_features) / in_features


def _row_bits(scheme: Scheme, in_features: int) -> int:
    return scheme.packed_width(in_features) * 32 + scheme.groups(in_features) * 32 * (1 + scheme.has_zeros)


# ---- measure ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSensitivity:
    """One planned linear: its stored weight ``[out_features, in_features]``, per candidate scheme
    the relative output error ``||X D^T||^2 / ||X W^T||^2`` it adds, and the layer's ``gain``:
    the model's output KL per unit of relative error (1 when not probed). ``errors`` (their
    product) is what a plan minimizes."""

    weight: str
    source: str
    out_features: int
    in_features: int
    relative: dict[str, float]
    gain: float = 1.0

    @property
    def params(self) -> int:
        return self.out_features * self.in_features

    @property
    def errors(self) -> dict[str, float]:
        return {scheme: value * self.gain for scheme, value in self.relative.items()}

    def bits(self, scheme: str) -> int:
        """Stored bits of this weight under ``scheme``."""
        return self.out_features * _row_bits(get_scheme(scheme), self.in_features)


@dataclass(frozen=True)
class SensitivityTable:
    layers: tuple[LayerSensitivity, ...]


def measure_sensitivity(module: Module, tokens: np.ndarray, candidates: tuple[str, ...] = DEFAULT_CANDIDATES,
                        keep_float: tuple[str, ...] = KEEP_FLOAT, probe: str | None = PROBE,
                        probe_samples: int = 1) -> SensitivityTable:
    """The relative output error of each candidate scheme at each linear of ``prefill`` reading a
    stored f32 weight (stream order, each weight once, none matching ``keep_float``), calibrated
    on the int32 token ids ``tokens[samples, seq_len]``; with ``probe``, each layer's gain from
    the KL of the ``logits`` entry's output on the first ``probe_samples`` rows when only that
    layer is quantized with ``probe`` (see the module docstring). A candidate that cannot quantize
    a layer's ``in_features`` (``Scheme.supports``) is left out for that layer."""
    schemes = [get_scheme(name) for name in candidates]
    planned = planned_weights(module, keep_float)
    layers: dict[str, LayerSensitivity] = {}

    def visit(linear: Node, weight: Node, inputs: list[np.ndarray]) -> None:
        name = weight.attr["name"]
        if name in layers or name not in planned:
            return
        x = np.concatenate([sample.reshape(-1, sample.shape[-1]) for sample in inputs]).astype(np.float64)
        gram = x.T @ x
        w = module.weights.get(name)
        energy = float(np.sum((w.astype(np.float64) @ gram) * w))
        relative = {}
        for scheme in schemes:
            if scheme.supports(w.shape[1]):
                delta = (w - scheme.dequantize(scheme.quantize(w))).astype(np.float64)
                relative[scheme.name] = float(np.sum((delta @ gram) * delta)) / energy if energy > 0 else 0.0
        if not relative:
            raise LLMOptError(f"no candidate scheme fits {name} ({w.shape[1]} input features): "
                              f"{', '.join(candidates)}.", "Add a per-channel candidate such as w8.")
        layers[name] = LayerSensitivity(name, linear.source, *w.shape, relative)

    stream_linears(module, tokens, visit)
    if probe is None:
        return SensitivityTable(tuple(layers.values()))
    return SensitivityTable(tuple(_with_gains(module, tokens[:probe_samples], list(layers.values()),
                                              get_scheme(probe))))


def planned_weights(module: Module, keep_float: tuple[str, ...] = KEEP_FLOAT) -> dict[str, Node]:
    """Stored weight name -> its weight node, for the linears of ``prefill`` a plan covers (program
    order, each weight once): those reading a static f32 weight, except the ``keep_float`` ones
    (patterns as in ``LayerRules``)."""
    floats = LayerRules("w8", ";".join(f"{pattern}=skip" for pattern in keep_float))  # None: kept float
    func = module.functions["prefill"]
    linears = func.node_map()
    planned = {}
    for linear, weight in linear_weights(func).items():
        name = weight.attr["name"]
        if name not in planned and floats.scheme_for(linears[linear].source, name) is not None:
            planned[name] = weight
    return planned


def _with_gains(module: Module, tokens: np.ndarray, layers: list[LayerSensitivity],
                probe: Scheme) -> list[LayerSensitivity]:
    """``layers`` with their gains: the mean KL(float || probed) of the next-token distributions
    over ``tokens`` when only that layer is quantized with ``probe`` (or, where ``probe`` is not
    one of the layer's candidates, its cheapest one), over the layer's relative error under it."""
    if "logits" not in module.functions:
        raise LLMOptError("measuring output impact needs the model's 'logits' entry point, which it lacks.",
                          "Measure without a probe (probe=None).")
    weights = _CachedWeights(module.weights)
    reference = [_log_probs(module, weights, row) for row in tokens]
    measured = []
    for layer in layers:
        scheme = probe if probe.name in layer.relative else get_scheme(min(layer.relative, key=layer.bits))
        w = weights.get(layer.weight)
        probed = _CachedWeights(weights, {layer.weight: scheme.dequantize(scheme.quantize(w))})
        kl = np.mean([np.sum(np.exp(ref) * (ref - _log_probs(module, probed, row)), axis=-1).mean()
                      for ref, row in zip(reference, tokens)])
        relative = layer.relative[scheme.name]
        measured.append(dataclasses.replace(layer, gain=float(kl) / relative if relative > 0 else 0.0))
    return measured


class _CachedWeights:
    """A module's weights loaded once (the probe reads each many times), with some replaced."""

    def __init__(self, store, replaced: dict[str, np.ndarray] | None = None):
        self.store, self.replaced = store, replaced or {}
        self.loaded: dict[str, np.ndarray] = {}

    def get(self, name: str) -> np.ndarray:
        if name in self.replaced:
            return self.replaced[name]
        if name not in self.loaded:
            self.loaded[name] = self.store.get(name)
        return self.loaded[name]


def _log_probs(module: Module, weights: _CachedWeights, ids: np.ndarray) -> np.ndarray:
    """Log-softmax of the ``logits`` entry's output on one row of token ids, f64 ``[seq, vocab]``."""
    feed = {"ids": ids[None, :].astype(np.int32), "pos": np.arange(len(ids), dtype=np.int32)}
    logits = run(module.functions["logits"], feed, weights)["logits"][0].astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# ---- choose ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedLayer:
    weight: str
    source: str
    params: int
    scheme: str
    bits_per_weight: float
    error: float


@dataclass(frozen=True)
class Plan:
    """One scheme per planned weight; ``bits_per_weight`` is the params-weighted average over
    them (the LM head and other float layers not counted)."""

    budget: float
    layers: tuple[PlannedLayer, ...]

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return sum(layer.params * layer.bits_per_weight for layer in self.layers) / self.params

    @property
    def error(self) -> float:
        return sum(layer.error for layer in self.layers)

    def rules(self, keep_float: tuple[str, ...] = KEEP_FLOAT) -> str:
        """``LayerRules`` text: ``keep_float`` patterns as ``skip``, then one rule per weight."""
        rules = [f"{pattern}=skip" for pattern in keep_float] + [f"{l.weight}={l.scheme}" for l in self.layers]
        text = ";".join(rules)
        parsed = LayerRules("skip", text)
        for layer in self.layers:  # a weight name inside another's would make first-match pick wrong
            found = parsed.scheme_for(layer.weight)
            if found is None or found.name != layer.scheme:
                raise LLMOptError(f"weight name {layer.weight} is also part of an earlier weight's name, so "
                                  "the plan cannot be written as rules.", "Rename the weights.")
        return text

    def to_json(self) -> dict:
        return {"budget_bits": self.budget, "bits_per_weight": round(self.bits_per_weight, 4),
                "counted": "planned linear weights (LM head and other float layers not counted)",
                "params": self.params, "predicted_error": self.error,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}


def choose_schemes(table: SensitivityTable, budget_bits: float) -> Plan:
    """The assignment of one candidate per layer with the least summed error whose average
    bits per weight (weighted by parameter count) is at most ``budget_bits``."""
    layers = table.layers
    options = [sorted(layer.errors) for layer in layers]
    bits = [[layer.bits(scheme) for scheme in names] for layer, names in zip(layers, options)]
    capacity = min(check_budget(layers, budget_bits), sum(max(costs) for costs in bits))  # more buys nothing
    cheapest = sum(min(costs) for costs in bits) / sum(layer.params for layer in layers)
    unit = max(reduce(math.gcd, (cost for costs in bits for cost in costs)),
               math.ceil(sum(max(costs) for costs in bits) / MAX_STATES))
    steps = [[-(-cost // unit) for cost in costs] for costs in bits]  # rounded up: the budget still holds
    chosen = _knapsack(steps, [[layer.errors[s] for s in names] for layer, names in zip(layers, options)],
                       capacity // unit)
    if chosen is None:
        raise LLMOptError(f"a budget of {budget_bits} bits per weight is too tight for this table's cost grid.",
                          f"Ask for slightly more than {cheapest:.4f} bits.")
    planned = tuple(PlannedLayer(layer.weight, layer.source, layer.params, names[c],
                                 bits_per_weight(names[c], layer.in_features), layer.errors[names[c]])
                    for layer, names, c in zip(layers, options, chosen))
    return Plan(budget_bits, planned)


def check_budget(layers: list[LayerSensitivity] | tuple[LayerSensitivity, ...], budget_bits: float) -> int:
    """The budget in stored bits over ``layers``; an LLMOptError naming the least feasible budget
    when even every layer's cheapest candidate exceeds it."""
    if not layers:
        raise LLMOptError("no linear layer to plan: the model has no quantizable linear weights.",
                          "Plan a model whose linears read stored weights.")
    if any(not layer.relative for layer in layers):
        raise LLMOptError("a layer has no candidate scheme that fits its input features.",
                          "Add a per-channel candidate such as w8.")
    params = sum(layer.params for layer in layers)
    least = sum(min(layer.bits(scheme) for scheme in layer.relative) for layer in layers)
    capacity = math.floor(budget_bits * params + 1e-9 * params)
    if capacity < least:
        cheapest = least / params
        raise LLMOptError(f"a budget of {budget_bits} bits per weight is below the cheapest plan, "
                          f"{cheapest:.4f} bits per weight (every layer at its cheapest candidate).",
                          f"Ask for at least {math.ceil(cheapest * 1000) / 1000} bits per weight, or add "
                          "cheaper candidates.")
    return capacity


def _knapsack(costs: list[list[int]], errors: list[list[float]], capacity: int) -> list[int] | None:
    """Per layer, the index of its option minimizing the summed error with summed cost at most
    ``capacity`` (exact, over integer costs); None when nothing fits."""
    best = np.zeros(capacity + 1)  # least error of the layers so far within each capacity
    choices = np.zeros((len(costs), capacity + 1), np.int16)
    for index, (layer_costs, layer_errors) in enumerate(zip(costs, errors)):
        new = np.full(capacity + 1, np.inf)
        for option, (cost, error) in enumerate(zip(layer_costs, layer_errors)):
            if cost > capacity:
                continue
            candidate = np.full(capacity + 1, np.inf)
            candidate[cost:] = best[:capacity + 1 - cost] + error
            better = candidate < new
            new[better], choices[index, better] = candidate[better], option
        best = new
    if not np.isfinite(best[capacity]):
        return None
    chosen, left = [], capacity
    for index in reversed(range(len(costs))):
        option = int(choices[index, left])
        chosen.append(option)
        left -= costs[index][option]
    return chosen[::-1]


# ---- the pass --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeMixed(Pass):
    """``quantize-mixed``: measure (``measure_sensitivity``), plan for ``budget`` bits per weight
    (``choose_schemes``), then run the quantization pass ``method`` with the plan as its rules.

    Requires: verified IR with ``prefill`` (and, to probe, ``logits``) entry points and a
    tokenizer for the calibration text. Guarantees: what ``method`` guarantees, with each planned
    weight quantized with its planned scheme (linears the plan does not name get ``method``'s
    scheme), and ``module.meta["quant_plan"]`` holding the plan (``Plan.to_json`` plus the method).
    Options: ``budget``; ``candidates`` (comma-separated schemes); ``probe`` (a scheme, or ``none``
    to rank layers by relative output error alone); the calibration set: ``calibration`` (a UTF-8
    text), ``samples``, ``seq_len``, ``seed``, and ``probe_samples`` (rows used to probe).
    Stats: ``method``'s, and ``planned`` weights.
    """

    name = "quantize-mixed"
    method: Pass = dataclasses.field(default_factory=QuantizeRTN)
    budget: float = 4.5
    candidates: str = ",".join(DEFAULT_CANDIDATES)
    probe: str = PROBE
    calibration: str = str(DEFAULT_CALIBRATION_TEXT)
    samples: int = 8
    seq_len: int = 256
    seed: int = 0
    probe_samples: int = 1

    def apply(self, module: Module) -> PassResult:
        tokens = calibration_tokens(module, self.calibration, self.samples, self.seq_len, self.seed)
        return self.apply_with_tokens(module, tokens)

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        """``apply`` on a given calibration set: int32 token ids ``[samples, seq_len]``."""
        candidates = tuple(name.strip() for name in self.candidates.split(",") if name.strip())
        shapes = [weight.type.shape for weight in planned_weights(module).values()]
        check_budget([LayerSensitivity("", "", n, k, {c: 0.0 for c in candidates if get_scheme(c).supports(k)})
                      for n, k in shapes], self.budget)  # before the measurement's minutes
        table = measure_sensitivity(module, tokens, candidates, probe=None if self.probe == "none" else self.probe,
                                    probe_samples=self.probe_samples)
        plan = choose_schemes(table, self.budget)
        result = dataclasses.replace(self.method, rules=plan.rules()).apply(module)
        quantized = result.module
        meta = {**quantized.meta, "quant_plan": {**plan.to_json(), "method": self.method.name}}
        return PassResult(Module(quantized.functions, quantized.weights, meta),
                          {**result.stats, "planned": len(plan.layers)})


CALIBRATION_OPTIONS = {"calibration": str, "samples": int, "seq_len": int, "seed": int}


def planned_quantization(method: Pass, budget: float, rules: str | None = None,
                         calibration: tuple[tuple[str, str], ...] = ()) -> QuantizeMixed:
    """The ``quantize-mixed`` pass of ``--bits-budget``: ``method`` (a quantization pass with a
    ``rules`` option) applies the plan; ``calibration`` (option, value) pairs set the measurement's
    calibration set (``calibration``, ``samples``, ``seq_len``, ``seed``)."""
    if rules is not None:
        raise LLMOptError("--quant-rules cannot be combined with --bits-budget: the plan sets every layer's scheme.",
                          "Leave out --quant-rules, or give up the budget and write the rules yourself.")
    if not budget > 0:
        raise LLMOptError(f"--bits-budget {budget} is not a positive number of bits per weight.",
                          "Pass e.g. --bits-budget 4.5.")
    options = {}
    for key, value in calibration:
        if key not in CALIBRATION_OPTIONS:
            raise LLMOptError(f"unknown calibration option {key!r}.", f"Known: {', '.join(CALIBRATION_OPTIONS)}.")
        options[key] = CALIBRATION_OPTIONS[key](value)
    return QuantizeMixed(method=method, budget=budget, **options)


def plan_table(plan: dict):
    """A rich table summarizing ``Plan.to_json()``: per scheme, its layers and share of weights."""
    from rich.table import Table
    table = Table(title=f"mixed-precision plan: {plan['bits_per_weight']:.3f} bits/weight (budget {plan['budget_bits']})",
                  caption=f"{plan['method']}; averaged over the {plan['params']:,} weights of the planned linears "
                          "(the LM head stays float and is not counted)")
    for column in ("scheme", "bits/weight", "layers", "share of weights"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    by_scheme: dict[str, list[dict]] = {}
    for layer in plan["layers"]:
        by_scheme.setdefault(layer["scheme"], []).append(layer)
    for scheme, layers in sorted(by_scheme.items(), key=lambda item: -item[1][0]["bits_per_weight"]):
        params = sum(layer["params"] for layer in layers)
        bits = sum(layer["params"] * layer["bits_per_weight"] for layer in layers) / params
        table.add_row(scheme, f"{bits:.3f}", str(len(layers)), f"{params / plan['params']:.1%}")
    return table
