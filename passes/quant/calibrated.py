"""The frame of every calibration-driven weight-quantization pass (GPTQ, AWQ, ...).

A subclass implements ``quantize_weight(w, inputs, scheme)``: the ``QuantizedWeight`` of one
linear's f32 weight ``w[N, K]`` given that linear's inputs on the calibration set (one array per
sample, last axis ``K``), computed on the outputs of the already-quantized layers before it (see
``stream_linears``). The frame chooses schemes per layer (``LayerRules``), streams the
calibration set through the model, and rewrites the graph with the codes the method chose
(``quantize_linears``). Weights that calibration never reached (a linear only in ``decode``)
fall back to round-to-nearest; so does an embedding table given its own scheme (a table tied to
a quantized linear shares that linear's codes, as in quantize-rtn). Methods that also rewrite the graph around the linears (AWQ scales
their inputs) override ``apply_with_tokens``, calling ``calibrate`` for the streamed results.
Every calibrated pass reports what calibration held in its stats (``memory_stats``):
``calibration_peak_mib``, the most MiB of activations and weights in use held at once, and
``calibration_rss_mib``, the process's peak RSS by the end of the stream.

Common options: ``scheme``, ``rules`` (as in quantize-rtn), ``calibration`` (a UTF-8 text file),
``samples`` and ``seq_len`` (the calibration set's size) and ``seed`` (where windows are cut).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir.graph import Module, Node
from ...ir.quant_schemes import QuantizedWeight, Scheme
from ..base import Pass, PassResult
from .calibration import CalibratedPass, StreamMemory, stream_linears
from .rewrite import LayerRules, quantize_linears


class Calibrated(dict):
    """A calibration run's results by key, and ``memory``: what the stream held."""

    def __init__(self, results: dict, memory: StreamMemory):
        super().__init__(results)
        self.memory = memory


def memory_stats(memory: StreamMemory) -> dict[str, int]:
    """Pass stats (whole MiB, rounded up) of what a calibration stream held."""
    return {"calibration_peak_mib": -(-memory.peak_bytes // 2**20),
            "calibration_rss_mib": -(-memory.process_peak_rss_bytes // 2**20)}


@dataclass(frozen=True)
class QuantizationOptions(Pass):
    """What every weight-quantization pass is asked for: the scheme and the per-layer rules."""

    scheme: str = "w4g128"
    rules: str = "lm_head=skip"


@dataclass(frozen=True)
class CalibratedQuantization(CalibratedPass, QuantizationOptions):

    def quantize_weight(self, w: np.ndarray, inputs: list[np.ndarray], scheme: Scheme) -> QuantizedWeight:
        raise NotImplementedError(f"{type(self).__name__} does not implement quantize_weight()")

    def effective_weight(self, quantized: QuantizedWeight, scheme: Scheme) -> np.ndarray:
        """What the rewritten graph multiplies by, in the ``[N, K]`` frame of the original weight
        (methods that also rescale the input override this); later layers calibrate on it."""
        return scheme.dequantize(quantized)

    def scheme_of(self, linear: Node, weight: Node) -> Scheme | None:
        """The scheme ``rules`` give ``linear`` reading ``weight`` (None: it stays float)."""
        return LayerRules(self.scheme, self.rules).scheme_for(linear.source, weight.attr["name"])

    def calibrate(self, module: Module, tokens: np.ndarray) -> Calibrated:
        """Stream ``tokens`` through ``module``: ``quantize_weight``'s result for each (weight
        name, scheme name) that calibration reached, later layers seeing ``effective_weight``."""
        LayerRules(self.scheme, self.rules)  # bad rules fail before any work
        results: dict[tuple[str, str], QuantizedWeight] = {}

        def visit(linear: Node, weight: Node, inputs: list[np.ndarray]) -> np.ndarray | None:
            scheme, name = self.scheme_of(linear, weight), weight.attr["name"]
            if scheme is None or not scheme.supports(weight.type.shape[1]):
                return None
            if (name, scheme.name) not in results:
                results[name, scheme.name] = self.quantize_weight(module.weights.get(name), inputs, scheme)
            return self.effective_weight(results[name, scheme.name], scheme)

        return Calibrated(results, stream_linears(module, tokens, visit))

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        """``apply`` on a given calibration set: int32 token ids ``[samples, seq_len]``."""
        results = self.calibrate(module, tokens)

        def produce(name: str, scheme: Scheme) -> QuantizedWeight:
            found = results.get((name, scheme.name))
            return found if found is not None else scheme.quantize(module.weights.get(name))

        result = quantize_linears(module, self.name, self.scheme_of, produce, tables=LayerRules(self.scheme, self.rules))
        return PassResult(result.module, {**result.stats, "calibrated": len(results), **memory_stats(results.memory)})
