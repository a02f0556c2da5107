"""The frame every pruning pass shares: options, per-layer levels, and the rewrite.

A method implements ``prune_weight(w, inputs, level)``: the pruned f32 copy of one linear's weight
``w[N, K]`` at ``level`` (``inputs``: that linear's inputs on the calibration set, one array per
sample with last axis ``K``, or None for methods without calibration and for weights calibration
never reached). ``Pruning.apply`` gives each linear its level (``PruneRules``) and replaces its
weight with the derived, pruned one (``replace_linear_weights``).

``CalibratedPruning`` first streams a calibration set through the model (``stream_linears``, as the
calibrated quantization passes do): each linear is pruned on the outputs of the already-pruned
linears before it, and later layers read its pruned weight. Weights calibration never reached (a
linear only in ``decode``) are pruned by magnitude within each output row.

Common options: ``sparsity`` (fraction pruned, in [0, 1); default 0.5) or ``nm`` (``"2:4"``: keep
N of every M consecutive inputs; wins over ``sparsity``), ``rules`` (per-layer levels,
``"pattern=level;..."`` with ``skip`` to keep a linear dense; default ``lm_head=skip``); calibrated
passes also take ``calibration`` (a UTF-8 text file), ``samples``, ``seq_len`` and ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...ir.graph import Module, Node
from ..base import Pass, PassResult
from ..quant.calibration import CalibratedPass, stream_linears
from .levels import Level, PruneRules, pass_level
from .masks import keep_mask
from .replace import replace_linear_weights


@dataclass(frozen=True)
class Pruning(Pass):
    sparsity: float = 0.5
    nm: str = ""
    rules: str = "lm_head=skip"

    def __post_init__(self):
        self.layer_rules()  # bad levels and rules fail before any work

    def layer_rules(self) -> PruneRules:
        return PruneRules(pass_level(self.sparsity, self.nm, self.name), self.rules)

    def prune_weight(self, w: np.ndarray, inputs: list[np.ndarray] | None, level: Level) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} does not implement prune_weight()")

    def level_of(self, rules: PruneRules, linear: Node, weight: Node) -> Level | None:
        """The level ``rules`` give ``linear`` reading ``weight`` (None: it stays dense)."""
        return rules.level_for(linear.source, weight.attr["name"])

    def pruned(self, module: Module, prune: Callable[[str, Level], np.ndarray]) -> PassResult:
        """Rewrite ``module``, the weight ``name`` at ``level`` becoming ``prune(name, level)``.
        Adds the stat ``skipped_shape``: linears left dense because N:M does not divide their inputs."""
        rules, levels, skipped = self.layer_rules(), {}, 0

        def choose(linear: Node, weight: Node) -> str | None:
            nonlocal skipped
            level = self.level_of(rules, linear, weight)
            if level is None:
                return None
            if not level.fits(weight.type.shape[1]):
                skipped += 1
                return None
            levels[level.tag] = level
            return level.tag

        result = replace_linear_weights(module, self.name, choose, lambda name, tag: prune(name, levels[tag]))
        return PassResult(result.module, {**result.stats, "skipped_shape": skipped})

    def apply(self, module: Module) -> PassResult:
        return self.pruned(module, lambda name, level: self.prune_weight(module.weights.get(name), None, level))


def magnitude_pruned(w: np.ndarray, level: Level, scope: str = "row") -> np.ndarray:
    """``w`` with the weights of lowest ``|w|`` set to zero (see ``masks.keep_mask``)."""
    w = np.asarray(w, np.float32)
    return np.where(keep_mask(np.abs(w), level, scope), w, np.float32(0))


@dataclass(frozen=True)
class CalibratedPruning(CalibratedPass, Pruning):

    def calibrate(self, module: Module, tokens: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
        """Stream ``tokens`` through ``module``: ``prune_weight``'s result for each (weight name,
        level tag) calibration reached, later layers reading the pruned weights."""
        rules = self.layer_rules()
        results: dict[tuple[str, str], np.ndarray] = {}

        def visit(linear: Node, weight: Node, inputs: list[np.ndarray]) -> np.ndarray | None:
            level, name = self.level_of(rules, linear, weight), weight.attr["name"]
            if level is None or not level.fits(weight.type.shape[1]):
                return None
            if (name, level.tag) not in results:
                results[name, level.tag] = np.asarray(self.prune_weight(module.weights.get(name), inputs, level),
                                                      np.float32)
            return results[name, level.tag]

        stream_linears(module, tokens, visit)
        return results

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        """``apply`` on a given calibration set: int32 token ids ``[samples, seq_len]``."""
        results = self.calibrate(module, tokens)

        def prune(name: str, level: Level) -> np.ndarray:
            found = results.get((name, level.tag))
            return found if found is not None else magnitude_pruned(module.weights.get(name), level, "row")

        result = self.pruned(module, prune)
        return PassResult(result.module, {**result.stats, "calibrated": len(results)})
