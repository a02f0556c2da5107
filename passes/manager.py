"""The PassManager, the pass registry, named pipelines, and the pipeline-spec parser.

A pipeline spec is a named pipeline (``"default"``) or a comma-separated list of pass names with
optional options in braces: ``"fuse-linears{min_group=3},fold-constants,cse,dce"``. Passes are
disabled by name with ``disabled=`` or ``LLMOPT_DISABLE_PASSES=cse,dce`` (to bisect a miscompile).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Iterable

from ..errors import LLMOptError
from ..ir.graph import Module
from .base import Pass
from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .fold_constants import FoldConstants
from .fuse_linears import FuseLinears
from .half_precision import HalfPrecision
from .quant.int8_activations import Int8Activations
from .instruments import Instrument
from .lowrank import LowRankASVD, LowRankSVD
from .prune import PruneMagnitude, PruneSparseGPT, PruneStructured, PruneWanda
from .prune.compact import CompactSparse
from .quant.awq import QuantizeAWQ
from .quant.gptq import QuantizeGPTQ
from .quant.kv_cache import QuantizeKVCache
from .quant.rtn import QuantizeRTN
from .quant.smoothquant import SmoothQuant

PASSES: dict[str, type[Pass]] = {cls.name: cls for cls in (
    DeadCodeElimination, CommonSubexpressionElimination, FoldConstants, FuseLinears, QuantizeRTN, QuantizeGPTQ,
    QuantizeKVCache, QuantizeAWQ)}
PASSES[SmoothQuant.name] = SmoothQuant
PASSES.update({cls.name: cls for cls in (PruneMagnitude, PruneWanda, PruneSparseGPT, PruneStructured, CompactSparse)})
PASSES.update({cls.name: cls for cls in (LowRankSVD, LowRankASVD)})
PASSES[HalfPrecision.name] = HalfPrecision
PASSES[Int8Activations.name] = Int8Activations

PIPELINES: dict[str, list[str]] = {
    "default": ["fuse-linears", "fold-constants", "cse", "dce"],
    "none": [],
}

DISABLE_ENV = "LLMOPT_DISABLE_PASSES"


def _split_top_level(spec: str) -> list[str]:
    """Split at commas outside braces: ``"a{x=1,y=2},b"`` -> ``["a{x=1,y=2}", "b"]``."""
    items, depth, current = [], 0, ""
    for char in spec:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items if item.strip()]


def _convert(value: str, kind, where: str):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
            raise LLMOptError(f"{where}: {value!r} is not a boolean.", "Write true or false.")
        return value.lower() in ("true", "1")
    try:
        return kind(value)
    except ValueError:
        raise LLMOptError(f"{where}: {value!r} is not a valid {kind.__name__}.", "Fix the option's value.") from None


def _make_pass(item: str) -> Pass:
    name, _, options = item.partition("{")
    name = name.strip()
    if name not in PASSES:
        raise LLMOptError(f"unknown pass {name!r} in the pipeline.", f"Known passes: {', '.join(sorted(PASSES))}.")
    cls = PASSES[name]
    if options and not options.endswith("}"):
        raise LLMOptError(f"pass options {item!r} are not closed with '}}'.",
                          "Write options as name{key=value,key=value}.")
    fields = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for option in filter(None, (o.strip() for o in options[:-1].split(","))):
        key, sep, value = (part.strip() for part in option.partition("="))
        if not sep or key not in known:
            raise LLMOptError(f"pass {name!r}: bad option {option!r}.",
                              f"Options of {name}: {', '.join(known) or 'none'} (as key=value).")
        kwargs[key] = _convert(value, fields[key], f"pass {name!r} option {key}")
    return cls(**kwargs)


def build_pipeline(spec: str | Iterable[str]) -> list[Pass]:
    """Passes from a spec: a named pipeline, ``"dce,cse,fuse-linears{min_group=2}"``, or a list of
    such items (items may also name pipelines, which expand in place)."""
    items = _split_top_level(spec) if isinstance(spec, str) else list(spec)
    passes: list[Pass] = []
    for item in items:
        passes += build_pipeline(PIPELINES[item]) if item in PIPELINES else [_make_pass(item)]
    return passes


def disabled_from_env() -> set[str]:
    return {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",") if name.strip()}


class PassManager:
    """Runs passes in order, calling the instruments around each; skips disabled passes.

    After ``run``, ``stats`` holds (pass name, stats) for each pass run and ``skipped`` the names
    of the disabled passes it did not run. Instruments run in the order given: put ``DumpIR``
    before ``Verify`` to have the IR a broken pass produced on disk when ``Verify`` raises.
    """

    def __init__(self, passes: Iterable[Pass], instruments: Iterable[Instrument] = (),
                 disabled: Iterable[str] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)
        known = set(PASSES) | {p.name for p in self.passes}
        for origin, names in (("--disable-pass", set(disabled)), (DISABLE_ENV, disabled_from_env())):
            unknown = sorted(names - known)
            if unknown:
                raise LLMOptError(f"{origin} names unknown pass(es): {', '.join(unknown)}.",
                                  f"Known passes: {', '.join(sorted(known))}.")
        self.disabled = set(disabled) | disabled_from_env()
        self.stats: list[tuple[str, dict[str, int]]] = []
        self.skipped: list[str] = []

    def run(self, module: Module) -> Module:
        self.stats, self.skipped = [], []
        for instrument in self.instruments:
            instrument.start(module)
        for pass_ in self.passes:
            if pass_.name in self.disabled:
                self.skipped.append(pass_.name)
                continue
            index = len(self.stats) + 1
            for instrument in self.instruments:
                instrument.before_pass(index, pass_, module)
            result = pass_.apply(module)
            module = result.module
            self.stats.append((pass_.name, result.stats))
            for instrument in self.instruments:
                instrument.after_pass(index, pass_, module, result.stats)
        return module
