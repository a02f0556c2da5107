"""``quantize-smoothquant``: SmoothQuant W8A8, int8 activations (per token) times int8 weights (per
output channel), with activation outliers first migrated into the weights (Xiao et al. 2023).

Options: ``alpha`` (migration strength, 0..1, default 0.5), ``rules`` (layers to keep in float,
``pattern=skip``; default ``lm_head=skip``; see ``LayerRules``), ``scheme`` (only ``w8``: the weight
codes ``linear_w8a8`` reads), and the calibration options of ``CalibratedQuantization``
(``calibration`` text, ``samples``, ``seq_len``, ``seed``; ``apply_with_tokens`` takes token ids).

How: the calibration set streams through ``prefill`` (``stream_linears``). Linears that read one
input value form a group (q, k and v; gate and up) sharing one smoothing factor ``s[K]``
(``smoothing_factors``: from the maximum over the calibration set of each input channel's
``|x|`` and of the group's weights' column maxima). Each visit returns the weight the quantized
graph effectively multiplies by, ``dequantize(quantize(W * s)) / s``, so later layers calibrate on
the outputs of the quantized ones before them; this covers the weight side only (the
activations' int8 rounding is not replayed during calibration). Then ``smooth_linears`` divides
the inputs by ``s`` (folded into the producing ``rms_norm``'s weight where it can be, else a
``mul``) and multiplies the weights by ``s``, and ``w8a8_linears`` turns every chosen linear into
``linear_w8a8`` of the smoothed weight's w8 codes. Linears calibration never reached (only in
``decode``) are quantized unsmoothed.

Requires: verified IR with a ``prefill(ids, pos)`` entry point. Guarantees: verified IR; every
``linear`` reading a static f32 ``[N, K]`` weight whose rule is not ``skip`` is a
``linear_w8a8``. Stats: ``quantized`` linears, ``weights_quantized``, ``calibrated`` groups,
``smoothed`` linears, ``folded`` norm weights, ``scaled`` inserted ``mul`` nodes, and what
calibration held (``calibration_peak_mib``, ``calibration_rss_mib``; see ``calibrated.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Function, Module
from ...ir.int8_ops import W8A8_WEIGHT_SCHEME
from ...ir.quant_schemes import get_scheme
from ..base import PassResult
from .calibrated import Calibrated, CalibratedQuantization, memory_stats
from .calibration import stream_linears
from .rewrite import KEEP_FLOAT, LayerRules, linear_weights
from .smoothing import smooth_linears, smoothed_name, smoothing_factors
from .w8a8 import w8a8_linears


def chosen_weights(module: Module, rules: LayerRules) -> set[str]:
    """Names of the stored weights of the linears ``rules`` do not keep in float."""
    chosen = set()
    for func in module.functions.values():
        nodes = func.node_map()
        for linear, weight in linear_weights(func).items():
            if rules.scheme_for(nodes[linear].source, weight.attr["name"]) is not None:
                chosen.add(weight.attr["name"])
    return chosen


def input_groups(func: Function, chosen: set[str]) -> dict[str, tuple[str, ...]]:
    """weight name -> the chosen weights whose linears read the same input (transitively: a weight read
    at two inputs joins their groups, whose factor then comes from the first input streamed)."""
    nodes, groups = func.node_map(), {}
    by_input: dict[str, set[str]] = {}
    for linear, weight in linear_weights(func).items():
        if weight.attr["name"] in chosen:
            by_input.setdefault(nodes[linear].inputs[0], set()).add(weight.attr["name"])
    for names in by_input.values():
        merged = set(names).union(*(groups.get(name, ()) for name in names))
        groups.update(dict.fromkeys(merged, tuple(sorted(merged))))
    return groups


@dataclass(frozen=True)
class SmoothQuant(CalibratedQuantization):
    """Smooth activation outliers into the weights, then run the linears in int8 (W8A8)."""

    name = "quantize-smoothquant"
    scheme: str = W8A8_WEIGHT_SCHEME
    alpha: float = 0.5

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        factors = self.calibrate(module, tokens)
        smoothed = smooth_linears(module, factors, self.name)
        chosen = chosen_weights(module, LayerRules(self.scheme, self.rules))
        quantized = w8a8_linears(smoothed.module, {smoothed_name(w) if w in factors else w for w in chosen}, self.name)
        calibrated = len({id(s) for s in factors.values()})
        return PassResult(quantized.module, {**quantized.stats, **smoothed.stats, "calibrated": calibrated,
                                             **memory_stats(factors.memory)})

    def calibrate(self, module: Module, tokens: np.ndarray) -> Calibrated:
        """weight name -> smoothing factor ``s[K]`` (one array object per group) of every chosen
        linear that ``prefill`` reaches, streaming the token ids ``tokens`` ``[samples, seq_len]``."""
        if self.scheme != W8A8_WEIGHT_SCHEME:
            raise LLMOptError(f"quantize-smoothquant quantizes weights to {W8A8_WEIGHT_SCHEME} only, "
                              f"not {self.scheme!r}.",
                              f"Drop the scheme option or pass scheme={W8A8_WEIGHT_SCHEME}.")
        if not 0 <= self.alpha <= 1:
            raise LLMOptError(f"quantize-smoothquant: alpha={self.alpha} is not in [0, 1].",
                              "Pass an alpha between 0 (no migration) and 1 (all of it); 0.5 is the usual choice.")
        rules = LayerRules(self.scheme, self.rules)
        other = [scheme for _, scheme in rules.parsed() if scheme not in KEEP_FLOAT + (W8A8_WEIGHT_SCHEME,)]
        if other:
            raise LLMOptError(f"quantize-smoothquant rules name {', '.join(other)}; W8A8 layers are w8 or float.",
                              "Write rules as pattern=skip (keep the layer float) or pattern=w8.")
        if "prefill" not in module.functions:
            raise LLMOptError("quantize-smoothquant calibrates on a prefill(ids, pos) entry point; this module has "
                              f"{', '.join(module.functions)}.", "Quantize a decoder traced by llmopt's frontends.")
        store, scheme = module.weights, get_scheme(self.scheme)
        groups = input_groups(module.functions["prefill"], chosen_weights(module, rules))
        factors: dict[str, np.ndarray] = {}

        def visit(linear, weight, inputs) -> np.ndarray | None:
            name = weight.attr["name"]
            if name not in groups:
                return None
            if name not in factors:
                act_max = np.max([np.abs(x).reshape(-1, x.shape[-1]).max(axis=0) for x in inputs], axis=0)
                weight_max = np.max([np.abs(store.get(w)).max(axis=0) for w in groups[name]], axis=0)
                factors.update(dict.fromkeys(groups[name], smoothing_factors(act_max, weight_max, self.alpha)))
            s = factors[name][None, :]
            return scheme.dequantize(scheme.quantize(store.get(name) * s)) / s

        return Calibrated(factors, stream_linears(module, tokens, visit))
