"""Find the pass that changed a model's outputs: binary search over pipeline prefixes.

``bisect_pipeline(module, passes, inputs, tolerance)`` runs the interpreter on the unmodified module
(the reference), then on the module after the first k passes for the k a binary search picks, and
returns the first pass after which an output differs from the reference by more than
``tolerance`` (max abs diff). Passes are cheap (weights load lazily), the interpreter is not: the
search interprets about log2(len(passes)) + 2 modules. It assumes a pipeline stays broken once a
pass broke it, which holds unless a later pass exactly undoes the damage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import LLMOptError
from ..ir.graph import Module
from ..ir.interp import run_module
from ..ir.types import DTYPES
from .base import Pass


def _entry(module: Module, entry: str):
    if entry not in module.functions:
        raise LLMOptError(f"bisect: the model has no entry point {entry!r}.",
                          f"Choose one of: {', '.join(module.functions)}.")
    return module.functions[entry]


@dataclass(frozen=True)
class BisectResult:
    """``culprit`` is the first bad pass (None when the whole pipeline is within tolerance) and
    ``index`` its 1-based position; ``diffs`` maps each prefix length probed to its max abs diff."""

    passes: tuple[str, ...]
    culprit: str | None
    index: int | None
    tolerance: float
    diffs: dict[int, float]

    def describe(self) -> str:
        probed = ", ".join(f"{k}: {v:.3g}" for k, v in sorted(self.diffs.items()))
        if self.culprit is None:
            return (f"no pass changes the outputs by more than {self.tolerance:g} "
                    f"(max abs diff after all {len(self.passes)} passes: {self.diffs[len(self.passes)]:.3g})")
        before = self.diffs.get(self.index - 1, 0.0)
        return (f"pass #{self.index} {self.culprit!r} broke the outputs: max abs diff {before:.3g} before it, "
                f"{self.diffs[self.index]:.3g} after it (tolerance {self.tolerance:g}; "
                f"max abs diff after k passes: {probed})")


def max_abs_diff(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    """The largest |want - got| over the outputs (inf when shapes differ or values are not finite)."""
    worst = 0.0
    for name, value in want.items():
        other = got[name]
        if value.shape != other.shape:
            return float("inf")
        diff = np.abs(value.astype(np.float64) - other.astype(np.float64))
        worst = max(worst, float(np.nanmax(diff, initial=0.0)) if np.isfinite(diff).all() else float("inf"))
    return worst


def bisect_pipeline(module: Module, passes: Sequence[Pass], inputs: dict[str, np.ndarray], tolerance: float = 1e-4,
                    entry: str = "logits", outputs: Sequence[str] | None = None) -> BisectResult:
    """The first of ``passes`` after which ``entry``'s ``outputs`` (all by default) on ``inputs``
    differ from the unmodified module's by more than ``tolerance``."""
    returned = [name for name, _ in _entry(module, entry).outputs]
    names = list(outputs) if outputs is not None else returned
    unknown = sorted(set(names) - set(returned))
    if unknown:
        raise LLMOptError(f"bisect: @{entry} has no output(s) {', '.join(unknown)}.",
                          "Name outputs the entry returns.")
    prefixes = [module]
    for pass_ in passes:
        prefixes.append(pass_.run(prefixes[-1]))

    def evaluate(module_: Module) -> dict[str, np.ndarray]:
        result = run_module(module_, entry, inputs)
        return {name: result[name] for name in names}

    reference = evaluate(module)
    diffs: dict[int, float] = {0: 0.0}

    def diff_after(k: int) -> float:
        if k not in diffs:
            diffs[k] = max_abs_diff(reference, evaluate(prefixes[k]))
        return diffs[k]

    labels = tuple(p.name for p in passes)
    if diff_after(len(passes)) <= tolerance:
        return BisectResult(labels, None, None, tolerance, diffs)
    good, bad = 0, len(passes)  # invariant: prefix `good` is within tolerance, prefix `bad` is not
    while bad - good > 1:
        middle = (good + bad) // 2
        if diff_after(middle) > tolerance:
            bad = middle
        else:
            good = middle
    return BisectResult(labels, passes[bad - 1].name, bad, tolerance, diffs)


def example_inputs(module: Module, entry: str, seq: int = 8, past: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a decoder entry: token ids below the vocabulary size, positions counting from
    ``past`` (0 without a cache), other values random normal; symbols ``seq``/``past`` take the
    given sizes, a cache's ``capacity`` ``past + seq`` rows (any other symbol: ``seq``)."""
    func = _entry(module, entry)
    rng = np.random.default_rng(seed)
    vocab = int((module.meta.get("decoder") or {}).get("vocab_size", 2))
    has_past = any(isinstance(d, str) and ("past" in d or "capacity" in d) for p in func.params for d in p.type.shape)
    sizes = {"seq": seq, "past": past, "capacity": past + seq}

    def size(dim) -> int:
        if isinstance(dim, int):
            return dim
        return sum(int(t) if t.strip().isdigit() else sizes.get(t.strip(), seq) for t in dim.split("+"))

    inputs = {}
    for param in func.params:
        shape = tuple(size(d) for d in param.type.shape)
        dtype = DTYPES[param.type.dtype]
        if param.name == "ids":
            inputs[param.name] = rng.integers(0, vocab, shape).astype(dtype)
        elif param.name == "pos":
            inputs[param.name] = (np.arange(shape[0]) + (past if has_past else 0)).astype(dtype)
        else:
            inputs[param.name] = rng.standard_normal(shape).astype(dtype)
    return inputs
