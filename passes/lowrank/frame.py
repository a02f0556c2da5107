"""The frame every low-rank pass shares: options, which weights to factorize at which rank, and the
rewrite.

A method implements ``factors(w, inputs, rank) -> (A, B)`` (``w[N, K] ~ A[N, r] @ B[r, K]``) and
``spectrum(w, inputs)`` (the singular values ``energy`` allocation ranks by); ``inputs`` are the
linear's inputs on the calibration set (one array per sample, last axis ``K``), or None for methods
without calibration and for weights calibration never reached.

``LowRank.apply``: the rules give each stored f32 weight a linear reads a ratio (its readers in
program order, the first one the rules do not skip decides), ``allocation`` turns ratios into ranks
(``allocation.py``), and each weight whose rank saves weights (``r (N + K) < N K``) is factorized
(``factorize.py``) in every linear the rules do not skip; the others stay dense.

``CalibratedLowRank`` streams a calibration set through the model (``quant.calibration``'s
``stream_linears``, as the calibrated pruning and quantization passes do): each weight is factorized
on the outputs of the already-factorized linears before it, and later layers read ``A @ B``. With
``allocation=energy`` a first, unchanged stream measures every weight's spectrum. Weights calibration
never reached (a linear only in ``decode``) get the plain truncated SVD.

Options: ``ratio`` (fraction of the chosen weights' parameters to remove, in [0, 1); default 0.2),
``rank`` (one fixed rank for every chosen weight, instead of ``ratio``; 0: use ``ratio``),
``allocation`` (``uniform``: each weight loses ``ratio`` of its own parameters; ``energy``: the same
total, ranks shared by the spectra), ``rules`` (per-layer ratios, ``"pattern=ratio;..."`` with
``skip`` to keep a linear dense, matched as pruning's rules; default ``lm_head=skip``); calibrated
passes also take ``calibration`` (a UTF-8 text file), ``samples``, ``seq_len`` and ``seed``.

Stats: ``factorized`` linears, ``weights_factorized``, ``kept_dense`` (chosen weights whose rank
would save nothing), ``params_before`` (weights of the chosen weights), ``params_after`` (what they
hold after: factors, or the dense weight), ``reduction`` (``1 - after / before``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Module, Node
from ..base import Pass, PassResult
from ..prune.levels import Level, PruneRules
from ..quant.calibration import CalibratedPass, stream_linears
from ..quant.rewrite import linear_weights
from .allocation import ALLOCATIONS, Target, energy_ranks, uniform_ranks
from .factorize import factorize_linears
from .factors import saves, singular_values, truncated_svd

RULES_HINT = ("Write rules like 'lm_head=skip;down_proj=0.3' (a fraction of parameters to remove, or skip), "
              "split by ';'.")


@dataclass(frozen=True)
class LowRank(Pass):
    ratio: float = 0.2
    rank: int = 0
    allocation: str = "uniform"
    rules: str = "lm_head=skip"

    method: ClassVar[str] = ""  # part of the derived weights' names: <weight>.<method>-r<rank>.a

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise LLMOptError(f"{self.name}: ratio={self.ratio} is not in [0, 1).",
                              "Pass the fraction of parameters to remove, e.g. ratio=0.2.")
        if self.rank < 0:
            raise LLMOptError(f"{self.name}: rank={self.rank} is negative.", "Pass rank=0 (use ratio) or a rank >= 1.")
        if self.allocation not in ALLOCATIONS:
            raise LLMOptError(f"{self.name}: allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}.",
                              "Use allocation=uniform (every layer alike) or allocation=energy (by spectra).")
        if self.rank and self.allocation != "uniform":
            raise LLMOptError(f"{self.name}: rank={self.rank} fixes every rank, so allocation={self.allocation} "
                              "has nothing to allocate.", "Pass either rank or allocation=energy with ratio.")
        self.layer_rules()  # bad rules fail before any work

    def layer_rules(self) -> PruneRules:
        try:
            rules = PruneRules(Level(sparsity=self.ratio), self.rules)
            nm = [f"{pattern}={level}" for pattern, level in rules.parsed() if level is not None and level.is_nm]
        except LLMOptError as error:
            raise LLMOptError(f"{self.name}: rules {self.rules!r}: {error.message}", RULES_HINT) from None
        if nm:
            raise LLMOptError(f"{self.name}: rule {nm[0]!r} is N:M, not a ratio of parameters.", RULES_HINT)
        return rules

    # -- what a method implements --------------------------------------------------------------

    def factors(self, w: np.ndarray, inputs: list[np.ndarray] | None, rank: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} does not implement factors()")

    def spectrum(self, w: np.ndarray, inputs: list[np.ndarray] | None) -> np.ndarray:
        return singular_values(w)

    # -- the plan ------------------------------------------------------------------------------

    def targets(self, module: Module) -> list[Target]:
        """The weights the rules choose, in program order, each with its ratio."""
        rules, chosen = self.layer_rules(), {}
        for func in module.functions.values():
            nodes = func.node_map()
            for linear, weight in linear_weights(func).items():
                name = weight.attr["name"]
                level = rules.level_for(nodes[linear].source, name)
                if level is not None and name not in chosen:
                    chosen[name] = Target(name, *weight.type.shape, level.sparsity)
        return list(chosen.values())

    def ranks(self, targets: list[Target], spectra: dict[str, np.ndarray]) -> dict[str, int]:
        """Each target's rank (all of them, including ranks that save nothing)."""
        if self.rank:
            return {t.name: min(self.rank, t.n, t.k) for t in targets}
        return energy_ranks(targets, spectra) if self.allocation == "energy" else uniform_ranks(targets)

    def factorized(self, module: Module, targets: list[Target], ranks: dict[str, int], produce) -> PassResult:
        """Rewrite ``module``, factorizing the targets whose rank saves weights, with ``produce``."""
        kept = {t.name: ranks[t.name] for t in targets if saves(t.n, t.k, ranks[t.name])}
        rules = self.layer_rules()
        def chosen(linear: Node, weight: Node) -> bool:
            return rules.level_for(linear.source, weight.attr["name"]) is not None

        result = factorize_linears(module, self.name, self.method, kept, produce, chosen)
        before = sum(t.params for t in targets)
        after = sum(kept[t.name] * (t.n + t.k) if t.name in kept else t.params for t in targets)
        return PassResult(result.module, {**result.stats, "kept_dense": len(targets) - len(kept),
                                          "params_before": before, "params_after": after,
                                          "reduction": round(1 - after / before, 6) if before else 0.0})

    def apply(self, module: Module) -> PassResult:
        targets = self.targets(module)
        spectra = {t.name: self.spectrum(module.weights.get(t.name), None) for t in targets} \
            if self.allocation == "energy" else {}
        return self.factorized(module, targets, self.ranks(targets, spectra),
                               lambda name, rank: self.factors(module.weights.get(name), None, rank))


@dataclass(frozen=True)
class CalibratedLowRank(CalibratedPass, LowRank):

    def calibrated_spectra(self, module: Module, tokens: np.ndarray, targets: list[Target]) -> dict[str, np.ndarray]:
        """Each target's ``spectrum`` on the unchanged model's inputs (without inputs where never reached)."""
        wanted, spectra = {t.name for t in targets}, {}

        def visit(linear: Node, weight: Node, inputs: list[np.ndarray]) -> None:
            name = weight.attr["name"]
            if name in wanted and name not in spectra:
                spectra[name] = self.spectrum(module.weights.get(name), inputs)

        stream_linears(module, tokens, visit)
        return {t.name: spectra[t.name] if t.name in spectra else self.spectrum(module.weights.get(t.name), None)
                for t in targets}

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        """``apply`` on a given calibration set: int32 token ids ``[samples, seq_len]``."""
        targets = self.targets(module)
        spectra = self.calibrated_spectra(module, tokens, targets) if self.allocation == "energy" else {}
        ranks = self.ranks(targets, spectra)
        wanted = {t.name for t in targets if saves(t.n, t.k, ranks[t.name])}
        results: dict[str, tuple[np.ndarray, np.ndarray]] = {}

        def visit(linear: Node, weight: Node, inputs: list[np.ndarray]) -> np.ndarray | None:
            name = weight.attr["name"]
            if name not in wanted:
                return None
            if name not in results:
                results[name] = self.factors(module.weights.get(name), inputs, ranks[name])
            a, b = results[name]
            return a @ b

        stream_linears(module, tokens, visit)

        def produce(name: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
            return results[name] if name in results else truncated_svd(module.weights.get(name), rank)

        result = self.factorized(module, targets, ranks, produce)
        return PassResult(result.module, {**result.stats, "calibrated": len(results)})
