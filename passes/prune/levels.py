"""How much of a weight to prune: a ``Level`` (unstructured sparsity, or N:M), and ``PruneRules``,
which give each linear its level (or keep it dense) by name.

A level is written ``0.5`` (prune half the weights, unstructured) or ``2:4`` (keep exactly 2 of
every 4 consecutive input weights of each output row). Rules are ``"pattern=level;pattern=level"``,
first match wins, else the pass's own level; the level ``skip`` (or ``dense``) keeps the linear
dense. Patterns match as in quantization's ``LayerRules``: the linear's provenance
(``model.layers.3.mlp.down_proj``, ``lm_head``) or its weight's name, as a glob or a substring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import LLMOptError
from ..quant.rewrite import _matches as matches

KEEP_DENSE = ("skip", "dense", "none")


@dataclass(frozen=True)
class Level:
    """Unstructured ``sparsity`` in [0, 1) when ``m == 0``; else N:M (``n`` kept of every ``m``)."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    @staticmethod
    def parse(text: str, where: str = "pruning level") -> "Level":
        text = text.strip()
        hint = "Write a sparsity in [0, 1) such as 0.5, or N:M with 0 < N < M such as 2:4."
        if ":" in text:
            n, _, m = text.partition(":")
            try:
                level = Level(n=int(n), m=int(m))
            except ValueError:
                raise LLMOptError(f"{where} {text!r} is not N:M with integers N and M.", hint) from None
        else:
            try:
                level = Level(sparsity=float(text))
            except ValueError:
                raise LLMOptError(f"{where} {text!r} is neither a sparsity nor N:M.", hint) from None
        level.check(where)
        return level

    def check(self, where: str = "pruning level") -> None:
        hint = "Write a sparsity in [0, 1) such as 0.5, or N:M with 0 < N < M such as 2:4."
        if self.is_nm and not 0 < self.n < self.m:
            raise LLMOptError(f"{where} {self.n}:{self.m} does not keep between 1 and M-1 of every M weights.", hint)
        if not self.is_nm and not 0 <= self.sparsity < 1:
            raise LLMOptError(f"{where} sparsity {self.sparsity} is not in [0, 1).", hint)

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def tag(self) -> str:
        """A name part for derived weights: ``s0.5``, ``2of4``."""
        return f"{self.n}of{self.m}" if self.is_nm else f"s{self.sparsity:g}"

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:g}"

    def fits(self, in_features: int) -> bool:
        """Whether a weight with ``in_features`` inputs can be pruned at this level (N:M needs whole groups)."""
        return not self.is_nm or in_features % self.m == 0

    def pruned_count(self, size: int) -> int:
        """How many of ``size`` weights an unstructured mask removes: ``floor(sparsity * size)``."""
        return int(math.floor(self.sparsity * size + 1e-9))


def pass_level(sparsity: float, nm: str, where: str) -> Level:
    """The level of a pass's ``sparsity`` and ``nm`` options (``nm``, when given, wins)."""
    level = Level.parse(nm, f"{where}: nm") if nm.strip() else Level(sparsity=float(sparsity))
    level.check(f"{where}: sparsity")
    return level


@dataclass(frozen=True)
class PruneRules:
    """Which level each linear gets: ``"pattern=level;..."``, first match wins, else ``default``."""

    default: Level
    rules: str = ""

    def __post_init__(self):
        self.parsed()  # bad rules fail before any work

    def parsed(self) -> list[tuple[str, Level | None]]:
        pairs = []
        for rule in filter(None, (r.strip() for r in self.rules.split(";"))):
            pattern, sep, level = (part.strip() for part in rule.partition("="))
            if not sep or not pattern or not level:
                raise LLMOptError(f"pruning rule {rule!r} is not pattern=level.",
                                  "Write rules like 'lm_head=skip;down_proj=0.3;mlp=2:4', separated by ';'.")
            pairs.append((pattern, None if level in KEEP_DENSE else Level.parse(level, f"pruning rule {rule!r}:")))
        return pairs

    def level_for(self, *names: str) -> Level | None:
        """The level of a linear known by ``names`` (provenance, weight name); None: keep it dense."""
        for pattern, level in self.parsed():
            if any(matches(pattern, name) for name in names if name):
                return level
        return self.default
