"""``quantize-awq``: activation-aware weight quantization (AWQ, Lin et al. 2023), calibrated on text.

Each linear ``y = x @ W.T`` is its own unit (after ``fuse-linears``: q/k/v is one linear, gate/up
one), with ``X`` its inputs on the calibration set (computed on the already-quantized layers
before it, see ``stream_linears``). Errors are measured on that linear's own output over every
calibration token, exactly, through ``H = X^T X``: ``||X D^T||^2 = sum_n D[n] H D[n]``.

- Scale search. ``x_mean[K]`` is the mean ``|x|`` of each input channel. For ``alpha = i / n_grid``
  (``i = 0 .. n_grid-1``), ``s = x_mean^alpha``, normalized by ``sqrt(max s * min s)``, the
  candidate weight is ``Q(W * s) / s`` (``Q``: the scheme's round-to-nearest), its loss
  ``||X W^T - X (Q(W * s) / s)^T||^2``. The ``s`` of the smallest loss wins; ``alpha = 0``
  (``s = 1``: plain round-to-nearest) is a candidate, so AWQ never does worse than RTN.
- Clipping search, on ``W * s`` in the frame of the rows divided by ``s``: each (output row,
  group) range is shrunk by one of ``clip_grid`` ratios from 1 down to ``max_shrink`` (``[-m r,
  m r]`` with ``m = max|w|`` for symmetric and codebook schemes, ``[min r, max r]`` for asymmetric
  ones), and the clipped group gets its round-to-nearest grid (``Scheme.grid``) and codes. A first
  sweep picks each group's ratio by that group's own share of the output error (AutoAWQ's
  ``auto_clip``); ``clip_sweeps`` more sweeps also count the cross terms with the row's other
  groups (coordinate descent on the row's exact error, never increasing it). A row whose error
  still exceeds its unclipped error keeps its unclipped codes: clipping never increases the loss.

The codes are the scheme's own (``Scheme.dequantize``-able) codes of ``W * s``; the graph divides
the linear's input by ``s`` (``smooth_linears``: folded into the weight of the ``rms_norm`` that
produces it when every reader of that norm is a linear with this ``s``, else a ``mul`` by the
derived weight ``1 / s``), then ``quantize_linears`` puts ``dequantize`` of those codes in front
of the linear. Linears whose search kept ``s = 1`` are not rescaled. During calibration later
layers see ``Q(W * s) / s``, what the rewritten graph computes in the original frame. Weights
calibration never reached (only in ``decode``) fall back to round-to-nearest.

Options: ``n_grid`` (scale candidates, default 20), ``clip_grid`` (clipping ratios, default 20;
0 turns clipping off), ``max_shrink`` (smallest ratio, default 0.5), ``clip_sweeps`` (coordinate
descent sweeps after the first, default 2), and those of every calibrated pass (``scheme``,
``rules``, ``calibration``, ``samples``, ``seq_len``, ``seed``; see ``calibrated.py``).

Requires: verified IR, a ``prefill`` entry point taking ``ids`` and ``pos``. Guarantees: as
``quantize-rtn``, with AWQ's codes and input scaling for every linear calibration reached (an
embedding table tied to a linear whose input is rescaled is no longer tied, that linear reading
``W * s``: it stays float unless a rule names its scheme, then it gets round-to-nearest codes of
``W``). Stats:
those of ``quantize-rtn``, ``calibrated`` weights, ``smoothed`` linears whose input is rescaled,
``folded`` norm weights absorbing ``1 / s`` and ``scaled`` inserted ``mul`` nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Module, Node
from ...ir.quant_schemes import QuantizedWeight, Scheme
from ..base import PassResult
from .calibrated import CalibratedQuantization, memory_stats
from .rewrite import LayerRules, quantize_linears
from .smoothing import smooth_linears, smoothed_name

MOMENT_CHUNK = 4096  # tokens per float32 product of X^T X
MIN_SCALE_INPUT = 1e-4  # floor of x_mean ** alpha (AutoAWQ's clamp), so dead channels keep a finite s


@dataclass(frozen=True)
class AWQWeight(QuantizedWeight):
    input_scale: np.ndarray | None  # f32 [K]: the codes are those of W * s; None: s = 1


def activation_scale(x_mean: np.ndarray, alpha: float) -> np.ndarray:
    """f32 ``s = x_mean^alpha``, normalized so that ``max s * min s = 1``."""
    s = np.maximum(x_mean.astype(np.float64) ** alpha, MIN_SCALE_INPUT)
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)


def input_moments(inputs: list[np.ndarray], in_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``|x|`` of each input channel and ``H = X^T X`` (f32 ``[K, K]``) over every token."""
    rows = np.concatenate([np.asarray(sample, np.float32).reshape(-1, in_features) for sample in inputs])
    h = np.zeros((in_features, in_features), np.float64)
    for start in range(0, len(rows), MOMENT_CHUNK):
        chunk = rows[start:start + MOMENT_CHUNK]
        h += chunk.T @ chunk
    return np.abs(rows).mean(axis=0, dtype=np.float64), h.astype(np.float32)


def row_errors(h: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``||X delta[n]||^2`` for each output row ``n`` of the weight error ``delta[N, K]``, as
    ``delta[n] H delta[n]`` with ``H = X^T X``."""
    return np.einsum("nk,nk->n", delta @ h, delta)


def search_scale(w: np.ndarray, x_mean: np.ndarray, h: np.ndarray, scheme: Scheme,
                 n_grid: int) -> tuple[np.ndarray, QuantizedWeight, np.ndarray]:
    """The best ``s``, the round-to-nearest codes of ``W * s`` and their row errors."""
    best = None
    for step in range(n_grid):
        s = activation_scale(x_mean, step / n_grid)
        quantized = scheme.quantize(w * s)
        errors = row_errors(h, w - scheme.dequantize(quantized) / s)
        if best is None or errors.sum() < best[2].sum():
            best = s, quantized, errors
    return best


class ClipSearch:
    """Per (output row, group) clipping ratios of ``ws[N, K]`` minimizing ``sum_n d[n] H d[n]`` (``d``:
    the quantization error, ``H`` in ``ws``'s frame): one sweep over the groups choosing each
    group's ratio on its own (``d_g H_gg d_g``, AutoAWQ's auto_clip), then ``sweeps`` sweeps that
    also count the cross terms with the other groups' current errors (coordinate descent: each
    step keeps or lowers the total)."""

    def __init__(self, ws: np.ndarray, h: np.ndarray, scheme: Scheme, ratios: np.ndarray):
        n, k = ws.shape
        self.scheme, self.h, self.ratios, self.ws = scheme, h, ratios, ws
        size = scheme.group_of(k)  # the last group is short when size does not divide k
        self.parts = [slice(start, min(start + size, k)) for start in range(0, k, size)]
        self.codes = np.zeros((n, k), np.uint8)
        self.scales = np.zeros((n, len(self.parts)), np.float32)
        self.zeros = np.zeros((n, len(self.parts)), np.float32) if scheme.has_zeros else None
        self.delta = np.zeros_like(ws)  # the current quantization error, [N, K]
        self.own_errors: dict[int, np.ndarray] = {}  # group -> [ratios, N]

    def candidates(self, g: int):
        """(codes, scale, zero, error) of group ``g`` of every row, clipped by each ratio."""
        values = self.ws[:, self.parts[g]]
        if self.scheme.has_zeros:
            low, high = values.min(axis=-1), values.max(axis=-1)
        else:
            high = np.abs(values).max(axis=-1)
            low = -high
        for ratio in self.ratios:
            clipped = np.clip(values, (low * ratio)[:, None], (high * ratio)[:, None])
            scale, zero = self.scheme.grid(clipped)
            codes = self.scheme.encode(clipped, scale, zero)
            yield codes, scale, zero, values - self.scheme.decode(codes, scale, zero)

    def sweep(self, cross: bool) -> None:
        rows = np.arange(len(self.ws))
        for g, part in enumerate(self.parts):
            codes, scales, zeros, deltas = (np.stack(parts) for parts in zip(*self.candidates(g)))
            if g not in self.own_errors:  # d_g H_gg d_g of each candidate: the same in every sweep
                products = (deltas.reshape(-1, deltas.shape[-1]) @ self.h[part, part]).reshape(deltas.shape)
                self.own_errors[g] = np.einsum("rni,rni->rn", products, deltas)
            errors = self.own_errors[g]
            if cross:  # + 2 d_g H_g,rest d_rest, with the other groups' current errors
                rest = self.delta @ self.h[:, part] - self.delta[:, part] @ self.h[part, part]
                errors = errors + 2 * np.einsum("rni,ni->rn", deltas, rest)
            best = errors.argmin(axis=0)
            self.codes[:, part], self.scales[:, g] = codes[best, rows], scales[best, rows]
            self.delta[:, part] = deltas[best, rows]
            if self.zeros is not None:
                self.zeros[:, g] = zeros[best, rows]

    def run(self, sweeps: int) -> QuantizedWeight:
        for index in range(sweeps + 1):
            self.sweep(cross=index > 0)
        return QuantizedWeight(self.codes, self.scales, self.zeros)


def rows_of(chosen: np.ndarray, first: QuantizedWeight, second: QuantizedWeight) -> QuantizedWeight:
    """Output rows ``chosen`` from ``first``, the others from ``second``."""
    def pick(a, b):
        return None if a is None else np.where(chosen[:, None], a, b)
    return QuantizedWeight(pick(first.codes, second.codes), pick(first.scales, second.scales),
                           pick(first.zeros, second.zeros))


@dataclass(frozen=True)
class QuantizeAWQ(CalibratedQuantization):
    """Quantize linear weights with AWQ's activation-aware scales and clipping; the graph divides
    each rescaled linear's input by its scale and dequantizes the weights."""

    name = "quantize-awq"
    n_grid: int = 20
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_sweeps: int = 2

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 0 or not 0 < self.max_shrink <= 1 or self.clip_sweeps < 0:
            raise LLMOptError(f"quantize-awq: n_grid={self.n_grid} must be >= 1, clip_grid={self.clip_grid} >= 0, "
                              f"max_shrink={self.max_shrink} in (0, 1] and clip_sweeps={self.clip_sweeps} >= 0.",
                              "Use e.g. n_grid=20, clip_grid=20, max_shrink=0.5, clip_sweeps=2.")

    def quantize_weight(self, w: np.ndarray, inputs: list[np.ndarray], scheme: Scheme) -> AWQWeight:
        w = np.asarray(w, np.float32)
        x_mean, h = input_moments(inputs, w.shape[1])
        s, quantized, errors = search_scale(w, x_mean, h, scheme, self.n_grid)
        if self.clip_grid:
            ratios = np.linspace(1.0, self.max_shrink, self.clip_grid)
            clipped = ClipSearch(w * s, h / np.outer(s, s), scheme, ratios).run(self.clip_sweeps)
            better = row_errors(h, w - scheme.dequantize(clipped) / s) <= errors
            quantized = rows_of(better, clipped, quantized)
        return AWQWeight(quantized.codes, quantized.scales, quantized.zeros, None if np.all(s == 1) else s)

    def effective_weight(self, quantized: AWQWeight, scheme: Scheme) -> np.ndarray:
        dequantized = scheme.dequantize(quantized)
        return dequantized if quantized.input_scale is None else dequantized / quantized.input_scale

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        results = self.calibrate(module, tokens)
        factors: dict[str, np.ndarray] = {}  # weight name -> s (one per weight: the first scheme's)
        for (name, _), result in results.items():
            if result.input_scale is not None:
                factors.setdefault(name, result.input_scale)
        smoothed = smooth_linears(module, factors, self.name)
        original = {smoothed_name(name): name for name in factors}
        rules = LayerRules(self.scheme, self.rules)

        def choose(linear: Node, weight: Node) -> Scheme | None:
            name = weight.attr["name"]
            return rules.scheme_for(linear.source, original.get(name, name))

        def produce(name: str, scheme: Scheme) -> QuantizedWeight:
            source = original.get(name, name)
            found = results.get((source, scheme.name))
            # a smoothed weight's readers all read <w>.smoothquant: an unsmoothed name with a factor
            # is an embedding table, which needs codes of w itself (no s)
            if found is not None and found.input_scale is (factors.get(source) if name in original else None):
                return found
            return scheme.quantize(smoothed.module.weights.get(name))  # not calibrated, or another scheme's s

        quantized = quantize_linears(smoothed.module, self.name, choose, produce, tables=rules)
        return PassResult(quantized.module, {**quantized.stats, **smoothed.stats, "calibrated": len(results),
                                             **memory_stats(results.memory)})
