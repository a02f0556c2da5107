"""What every weight-quantization pass shares: which scheme each linear (and embedding table) gets,
and the rewrite that puts ``dequantize`` of derived low-bit weights in front of it.

A method (RTN, GPTQ, AWQ, ...) only decides the codes: it hands ``quantize_linears`` a function
``produce(weight_name, scheme) -> QuantizedWeight``. The rewrite registers, per quantized source
weight, derived weights ``<weight>.<scheme>.packed`` (u32), ``.scales`` and, when the scheme has
zero points, ``.zeros`` (f32) in a NEW WeightStore (the old entries kept), and replaces the weight
operand of each chosen ``linear`` with ``dequantize(packed, scales[, zeros]) {scheme, out_features,
in_features}``. ``produce`` runs lazily, when a part is first loaded, and the parts of one weight
share one call (kept until each part was loaded once); the same weight read in several functions
gets one set of derived weights, and one ``dequantize`` node per function reads them.

Embedding tables (``quantize_linears(..., tables=rules)``): an ``embedding`` reading a stored f32
``[V, D]`` weight reads ``dequantize`` of that weight's derived weights instead when its scheme
(``LayerRules.table_scheme_for``) is not ``skip``: the scheme of the first rule matching the
embedding's provenance (``model.embed_tokens``) or weight name; without a matching rule, the
scheme of a quantized linear reading the same weight (a tied LM head: one set of codes, one
``dequantize`` node, serves both); otherwise the table stays float (the default scheme never
reaches a table). The interpreter's ``embedding(dequantize(...))`` is the dequantized rows.

The original weight node stays; ``dce`` drops it when nothing else reads it.
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
    a substring. The scheme ``skip`` keeps the layer in float. Embedding tables follow
    ``table_scheme_for``: a matching rule, else the linear they are tied to, never ``default``."""

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

    def rule_for(self, *names: str) -> str | None:
        """The scheme (text) of the first rule matching one of ``names``; None: no rule matches."""
        for pattern, scheme in self.parsed():
            if any(_matches(pattern, name) for name in names if name):
                return scheme
        return None

    def scheme_for(self, *names: str) -> Scheme | None:
        """The scheme of a linear known by ``names`` (provenance, weight name); None: keep float."""
        return _scheme(self.rule_for(*names) or self.default)

    def table_scheme_for(self, *names: str, tied: Scheme | None = None) -> Scheme | None:
        """The scheme of an embedding table known by ``names`` (provenance, weight name): the first
        matching rule's, else ``tied`` (the scheme of the quantized linear reading the same weight,
        if any); None: keep float. ``default`` does not apply to tables."""
        chosen = self.rule_for(*names)
        return tied if chosen is None else _scheme(chosen)


def _scheme(name: str) -> Scheme | None:
    return None if name in KEEP_FLOAT else get_scheme(name)


def _matches(pattern: str, name: str) -> bool:
    if any(char in pattern for char in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


Produce = Callable[[str, Scheme], QuantizedWeight]

ROW_BLOCK_VALUES = 1 << 22
"""Values per row block when a weight is quantized or packed a block of rows at a time."""


def row_blocks(rows: int, columns: int) -> list[slice]:
    """Slices of ``rows`` holding about ROW_BLOCK_VALUES values of ``columns`` each (one row at least).
    Rows are quantized and packed independently, so doing it block by block gives the same result
    while the temporaries (several copies of what is processed) stay those of one block."""
    step = max(1, ROW_BLOCK_VALUES // max(columns, 1))
    return [slice(start, start + step) for start in range(0, max(rows, 1), step)]


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
            codes = quantized.codes
            return np.concatenate([self.scheme.pack(codes[rows]) for rows in row_blocks(*codes.shape)])
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


def _static_matrix(node: Node | None) -> bool:
    return node is not None and node.type.dtype == "f32" and node.type.rank == 2 and node.type.is_static


def linear_weights(func: Function) -> dict[str, Node]:
    """linear node name -> the ``weight`` node it reads as a static f32 ``[N, K]`` weight (only the
    linears that read one: the ones a quantization method can quantize)."""
    weights = {n.name: n for n in func.nodes if n.op == "weight"}
    return {node.name: weights[node.inputs[1]] for node in func.nodes
            if node.op == "linear" and _static_matrix(weights.get(node.inputs[1]))}


def embedding_tables(func: Function) -> dict[str, Node]:
    """embedding node name -> the ``weight`` node it reads as a static f32 ``[V, D]`` table."""
    weights = {n.name: n for n in func.nodes if n.op == "weight"}
    return {node.name: weights[node.inputs[1]] for node in func.nodes
            if node.op == "embedding" and _static_matrix(weights.get(node.inputs[1]))}


Choose = Callable[[Node, Node], Scheme | None]


def _fits(scheme: Scheme | None, weight: Node) -> Scheme | None:
    return scheme if scheme is not None and scheme.supports(weight.type.shape[1]) else None


def tied_schemes(module: Module, choose: Choose) -> dict[str, Scheme]:
    """weight name -> the scheme ``choose`` gives the first linear (over every function, in order)
    that reads it and gets quantized: what a table tied to that weight follows by default."""
    tied: dict[str, Scheme] = {}
    for func in module.functions.values():
        nodes = func.node_map()
        for linear, weight in linear_weights(func).items():
            scheme = _fits(choose(nodes[linear], weight), weight)
            if scheme is not None:
                tied.setdefault(weight.attr["name"], scheme)
    return tied


def quantize_linears(module: Module, pass_name: str, choose: Choose, produce: Produce,
                     tables: LayerRules | None = None) -> PassResult:
    """Replace the weight of each linear for which ``choose(linear, weight_node)`` names a scheme,
    and, with ``tables``, the table of each embedding whose ``tables.table_scheme_for`` (its
    provenance and weight name, tied to what ``choose`` gives the linears reading the same weight)
    names one. One ``dequantize`` per (weight, scheme) and function serves every reader.

    Stats: ``quantized`` linears, ``weights_quantized`` distinct (weight, scheme) pairs,
    ``skipped_shape`` linears (and tables) left in float because their weight does not fit the
    scheme's groups, and, when any, ``tables_quantized`` embeddings reading a dequantized table.
    """
    derived = DerivedWeights(module.weights, produce, pass_name)
    tied = tied_schemes(module, choose) if tables is not None else {}

    def rewrite(func: Function) -> tuple[Function, Counter]:
        stats = Counter(quantized=0, skipped_shape=0)
        weights, table_weights = linear_weights(func), embedding_tables(func) if tables is not None else {}
        dequantized: dict[tuple[str, str], str] = {}  # (weight name, scheme) -> its dequantize here

        def scheme_of(node: Node, weight: Node) -> Scheme | None:
            if node.name in weights:
                return choose(node, weight)
            return tables.table_scheme_for(node.source, weight.attr["name"], tied=tied.get(weight.attr["name"]))

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            weight = weights.get(node.name) or table_weights.get(node.name)
            scheme = scheme_of(node, weight) if weight is not None else None
            if scheme is None:
                return None
            n, k = weight.type.shape
            if not scheme.supports(k):
                stats["skipped_shape"] += 1
                return None
            key = (weight.attr["name"], scheme.name)
            if key not in dequantized:
                names = derived.derive(weight.attr["name"], weight.type, scheme)
                operands = [b.add("weight", type=derived.store.type(name), name=name) for name in names.values()]
                dequantized[key] = b.add("dequantize", *operands, scheme=scheme.name, out_features=n, in_features=k)
            inputs = list(renamed(node, rename))
            inputs[1] = dequantized[key]
            stats["quantized" if node.op == "linear" else "tables_quantized"] += 1
            return b.copy_node(node, tuple(inputs))

        return rebuild(func, replace, pass_name), stats

    result = map_functions(module, rewrite, weights=derived.store)
    return PassResult(result.module, {**result.stats, "weights_quantized": len(derived.by_source)})
