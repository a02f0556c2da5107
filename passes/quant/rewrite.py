"""What every weight-quantization pass shares: which scheme each linear gets, and the rewrite that
puts ``dequantize`` of derived low-bit weights in front of it.

A method (RTN, GPTQ, AWQ, ...) only decides the codes: it hands ``quantize_linears`` a function
``produce(weight_name, scheme) -> QuantizedWeight``. The rewrite registers, per quantized source
weight, derived weights ``<weight>.<scheme>.packed`` (u32), ``.scales`` and, when the scheme has
zero points, ``.zeros`` (f32) in a NEW WeightStore (the old entries kept), and replaces the weight
operand of each chosen ``linear`` with ``dequantize(packed, scales[, zeros]) {scheme, out_features,
in_features}``. ``produce`` runs lazily, when a part is first loaded, and the parts of one weight
share one call (kept until each part was loaded once); the same weight read in several functions
gets one set of derived weights. The original weight node stays; ``dce`` drops it when nothing else
reads it.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Builder, Function, Module, Node
from ...ir.quant_schemes import QuantizedWeight, Scheme, get_scheme
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from ..base import PassResult, map_functions
from ..rewrite import rebuild, renamed

KEEP_FLOAT = ("skip", "fp32", "none")


@dataclass(frozen=True)
class LayerRules:
    """Which scheme each linear gets: ``"pattern=scheme;pattern=scheme"``, first match wins, else
    ``default``. A pattern matches the linear's provenance (``model.layers.3.mlp.down_proj``, or
    ``lm_head``) or its weight's name, as a glob (``*layers.[0-3].*``) or, without glob characters, as
    a substring. The scheme ``skip`` keeps the layer in float."""

    default: str
    rules: str = ""

    def __post_init__(self):
        for pattern, scheme in self.parsed():
            if scheme not in KEEP_FLOAT:
                get_scheme(scheme)

    def parsed(self) -> list[tuple[str, str]]:
        pairs = []
        for rule in filter(None, (r.strip() for r in self.rules.split(";"))):
            pattern, sep, scheme = (part.strip() for part in rule.partition("="))
            if not sep or not pattern or not scheme:
                raise LLMOptError(f"quantization rule {rule!r} is not pattern=scheme.",
                                  "Write rules like 'lm_head=w8;down_proj=skip', separated by ';'.")
            pairs.append((pattern, scheme))
        return pairs

    def scheme_for(self, *names: str) -> Scheme | None:
        """The scheme of a linear known by ``names`` (provenance, weight name); None: keep float."""
        chosen = self.default
        for pattern, scheme in self.parsed():
            if any(_matches(pattern, name) for name in names if name):
                chosen = scheme
                break
        return None if chosen in KEEP_FLOAT else get_scheme(chosen)


def _matches(pattern: str, name: str) -> bool:
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


Produce = Callable[[str, Scheme], QuantizedWeight]


class _LazyQuantization:
    """One weight's quantization, computed when a part is first asked for."""

    def __init__(self, produce: Produce, source: str, scheme: Scheme, parts: tuple[str, ...]):
        self.produce, self.source, self.scheme, self.parts = produce, source, scheme, parts
        self.cached: QuantizedWeight | None = None
        self.pending: set[str] = set()

    def load(self, part: str) -> np.ndarray:
        if self.cached is None:
            self.cached, self.pending = self.produce(self.source, self.scheme), set(self.parts)
        quantized = self.cached
        self.pending.discard(part)
        if not self.pending:  # every part was handed out once: free the memory
            self.cached = None
        if part == "packed":
            return self.scheme.pack(quantized.codes)
        return np.ascontiguousarray(getattr(quantized, part), dtype=np.float32)


class DerivedWeights:
    """The new store, and the derived weights of each (source weight, scheme)."""

    def __init__(self, old: WeightStore, produce: Produce, pass_name: str):
        self.produce, self.pass_name = produce, pass_name
        self.store = WeightStore()
        for name in old:
            entry = old.entry(name)
            self.store.add(name, entry.type, entry.load, entry.origin)
        self.by_source: dict[tuple[str, str], dict[str, str]] = {}

    def derive(self, source: str, type: TensorType, scheme: Scheme) -> dict[str, str]:
        """part -> derived weight name, for the source weight ``source`` of type ``[N, K]``."""
        key = (source, scheme.name)
        if key in self.by_source:
            return self.by_source[key]
        n, k = type.shape
        parts = ("packed", "scales", "zeros") if scheme.has_zeros else ("packed", "scales")
        types = {"packed": TensorType("u32", (n, scheme.packed_width(k))),
                 "scales": TensorType("f32", (n, scheme.groups(k))),
                 "zeros": TensorType("f32", (n, scheme.groups(k)))}
        lazy = _LazyQuantization(self.produce, source, scheme, parts)
        names = {}
        for part in parts:
            names[part] = f"{source}.{scheme.name}.{part}"
            self.store.add(names[part], types[part], lambda part=part: lazy.load(part),
                           origin=f"{self.pass_name}: {part} of {source} ({scheme.name})")
        self.by_source[key] = names
        return names


def linear_weights(func: Function) -> dict[str, Node]:
    """linear node name -> the ``weight`` node it reads as a static f32 ``[N, K]`` weight (only the
    linears that read one: the ones a quantization method can quantize)."""
    weights = {n.name: n for n in func.nodes if n.op == "weight"}
    found = {}
    for node in func.nodes:
        weight = weights.get(node.inputs[1]) if node.op == "linear" else None
        if weight is not None and weight.type.dtype == "f32" and weight.type.rank == 2 and weight.type.is_static:
            found[node.name] = weight
    return found


def quantize_linears(module: Module, pass_name: str, choose: Callable[[Node, Node], Scheme | None],
                     produce: Produce) -> PassResult:
    """Replace the weight of each linear for which ``choose(linear, weight_node)`` names a scheme.

    Stats: ``quantized`` linears, ``weights_quantized`` distinct (weight, scheme) pairs,
    ``skipped_shape`` linears left in float because their weight does not fit the scheme's groups.
    """
    derived = DerivedWeights(module.weights, produce, pass_name)

    def rewrite(func: Function) -> tuple[Function, Counter]:
        stats = Counter(quantized=0, skipped_shape=0)
        weights = linear_weights(func)

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            weight = weights.get(node.name)
            if weight is None:
                return None
            scheme = choose(node, weight)
            if scheme is None:
                return None
            n, k = weight.type.shape
            if not scheme.supports(k):
                stats["skipped_shape"] += 1
                return None
            names = derived.derive(weight.attr["name"], weight.type, scheme)
            operands = [b.add("weight", type=derived.store.type(name), name=name) for name in names.values()]
            dequantized = b.add("dequantize", *operands, scheme=scheme.name, out_features=n, in_features=k)
            inputs = list(renamed(node, rename))
            inputs[1] = dequantized
            stats["quantized"] += 1
            return b.copy_node(node, tuple(inputs))

        return rebuild(func, replace, pass_name), stats

    result = map_functions(module, rewrite, weights=derived.store)
    return PassResult(result.module, {**result.stats, "weights_quantized": len(derived.by_source)})
