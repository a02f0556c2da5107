"""``quantize-rtn``: round-to-nearest weight quantization of every ``linear`` that reads a stored weight.

Options: ``scheme`` (a name in ``ir.quant_schemes.SCHEMES``, default ``w4g128``) and ``exclude``
(comma-separated substrings; a weight whose name contains one stays in float, default ``lm_head``).
In a pipeline spec the option list is itself comma-separated, so only one substring fits there.

Requires: verified IR. Guarantees: the weight operand of every ``linear`` whose weight is a
``weight`` node of static f32 type ``[N, K]``, not excluded, with ``K`` a multiple of the scheme's
group size, becomes ``dequantize(packed, scales[, zeros]) {scheme, out_features=N, in_features=K}``
over three derived weights ``<weight>.<scheme>.packed`` (u32), ``.scales`` and, for asymmetric
schemes, ``.zeros`` (f32), registered in a NEW WeightStore with the old entries. Nothing is
quantized while the pass runs: the derived weights' loaders quantize the source weight when asked,
and the parts of one weight share one quantization (kept until each part was loaded once).
The same weight read in several functions gets one set of derived weights. New nodes carry
``created_by="quantize-rtn"`` and the linear's ``source``. The original weight node stays; ``dce``
drops it when nothing else reads it.

Stats: ``quantized`` linears, ``weights_quantized`` distinct weights, ``skipped_shape`` linears left
in float because their weight does not fit the scheme's groups.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ...ir.graph import Builder, Function, Module, Node
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from ..base import Pass, PassResult, map_functions
from ..rewrite import rebuild, renamed
from ...ir.quant_schemes import QuantizedWeight, Scheme, get_scheme

PARTS = ("packed", "scales", "zeros")


class _LazyQuantization:
    """One weight's quantization, computed when a part is first asked for."""

    def __init__(self, store: WeightStore, source: str, scheme: Scheme, parts: tuple[str, ...]):
        self.store, self.source, self.scheme, self.parts = store, source, scheme, parts
        self.cached: QuantizedWeight | None = None
        self.pending: set[str] = set()

    def load(self, part: str) -> np.ndarray:
        if self.cached is None:
            self.cached, self.pending = self.scheme.quantize(self.store.get(self.source)), set(self.parts)
        quantized = self.cached
        self.pending.discard(part)
        if not self.pending:  # every part was handed out once: free the memory
            self.cached = None
        if part == "packed":
            return self.scheme.pack(quantized.codes)
        return np.ascontiguousarray(getattr(quantized, part))


class _QuantizedWeights:
    """The new store, and the derived weights of each quantized source weight."""

    def __init__(self, old: WeightStore, scheme: Scheme):
        self.scheme = scheme
        self.store = WeightStore()
        for name in old:
            entry = old.entry(name)
            self.store.add(name, entry.type, entry.load, entry.origin)
        self.by_source: dict[str, dict[str, str]] = {}

    def derive(self, source: str, type: TensorType) -> dict[str, str]:
        """part -> derived weight name, for the source weight ``source`` of type ``[N, K]``."""
        if source in self.by_source:
            return self.by_source[source]
        scheme = self.scheme
        n, k = type.shape
        parts = PARTS if not scheme.symmetric else PARTS[:2]
        types = {"packed": TensorType("u32", (n, scheme.packed_width(k))),
                 "scales": TensorType("f32", (n, scheme.groups(k))),
                 "zeros": TensorType("f32", (n, scheme.groups(k)))}
        lazy = _LazyQuantization(self.store, source, scheme, parts)
        names = {}
        for part in parts:
            names[part] = f"{source}.{scheme.name}.{part}"
            self.store.add(names[part], types[part], lambda part=part: lazy.load(part),
                           origin=f"quantize-rtn: {part} of {source} ({scheme.name})")
        self.by_source[source] = names
        return names


@dataclass(frozen=True)
class QuantizeRTN(Pass):
    """Quantize linear weights round-to-nearest; the graph dequantizes them before each linear."""

    name = "quantize-rtn"
    scheme: str = "w4g128"
    exclude: str = "lm_head"

    def apply(self, module: Module) -> PassResult:
        scheme = get_scheme(self.scheme)
        derived = _QuantizedWeights(module.weights, scheme)
        result = map_functions(module, lambda func: self.rewrite_function(func, derived), weights=derived.store)
        return PassResult(result.module, {**result.stats, "weights_quantized": len(derived.by_source)})

    def excluded(self, weight_name: str) -> bool:
        return any(part.strip() and part.strip() in weight_name for part in self.exclude.split(","))

    def rewrite_function(self, func: Function, derived: _QuantizedWeights) -> tuple[Function, Counter]:
        scheme = derived.scheme
        stats = Counter(quantized=0, skipped_shape=0)
        weight_of = {n.name: n for n in func.nodes if n.op == "weight"}

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            weight = weight_of.get(node.inputs[1]) if node.op == "linear" else None
            if weight is None or self.excluded(weight.attr["name"]):
                return None
            type = weight.type
            if type.dtype != "f32" or type.rank != 2 or not type.is_static:
                return None
            if not scheme.supports(type.shape[1]):
                stats["skipped_shape"] += 1
                return None
            names = derived.derive(weight.attr["name"], type)
            operands = [b.add("weight", type=derived.store.type(names[part]), name=names[part])
                        for part in PARTS if part in names]
            dequantized = b.add("dequantize", *operands, scheme=scheme.name,
                                out_features=type.shape[0], in_features=type.shape[1])
            inputs = list(renamed(node, rename))
            inputs[1] = dequantized
            stats["quantized"] += 1
            return b.copy_node(node, tuple(inputs))

        return rebuild(func, replace, self.name), stats
