"""``half-precision``: run the model in fp16 — weights stored as f16; activations and KV cache f16
too (``activations="f16"``, the GPU targets), or kept f32 (``activations="f32"``, the CPU target).

Option ``activations``: ``"f16"`` or ``"f32"``.

Requires: verified IR whose float values are all f32 (a model as the frontends trace it, after any
pruning, low-rank or weight-quantization pass). Quantized weights may be present (their codes,
scales and zeros keep their dtypes). With ``activations="f16"``, int8 activations
(``linear_w8a8``) and an int8 KV cache are refused: they are f32 designs.

Guarantees, ``activations="f16"``:
- every f32 weight a function reads is stored as f16 (rounded to nearest; values beyond f16's
  range are refused, naming the weight), so float weights take half the bytes;
- every f32 value, param and constant of every function becomes f16, and each ``dequantize``
  yields f16; the IR's f16 semantics are "compute in f32, round the result to f16" (the
  interpreter does exactly that; kernels accumulate reductions in f32);
- outputs named ``logits`` stay f32 (a ``cast`` at the end), so runtimes, perplexity and sampling
  read the same dtype as before; the KV cache (params and outputs ``k.i``/``v.i``) is f16, and
  ``module.meta["kv_cache"]["dtype"]`` says so; ``module.meta["dtype"]`` is ``"f16"``.

Guarantees, ``activations="f32"`` (weights only): every f32 ``[N, K]`` weight read only as the
weight of ``linear`` nodes or as an ``embedding`` table is stored as f16; a linear reads it as is
(``linear`` widens an f16 weight: x f32 times w f16 is f32), an embedding's rows are cast back to
f32 right after the gather. Everything else (norm weights, biases, activations, the KV cache) stays
f32; ``module.meta["dtype"]`` is ``"f16-weights"``.

New nodes carry ``created_by="half-precision"``.

Stats: ``weights`` converted, ``values`` retyped, ``casts`` added.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..errors import LLMOptError
from ..ir.graph import Builder, Function, Module, Node, weight_reads
from ..ir.weights import WeightStore
from .base import Pass, PassResult
from .rewrite import rebuild, renamed

FULL, HALF = "f32", "f16"
HALF_WEIGHTS = "f16-weights"  # module.meta["dtype"] of the weights-only mode
WIDENED_READS = {("linear", 1), ("embedding", 1)}  # reads of an f16 weight the weights-only mode allows
KEPT_FULL_OUTPUTS = ("logits",)
F32_ONLY_OPS = ("linear_w8a8", "linear_w4a8", "quantize_rows_i8", "dequantize_rows_i8", "row_scale_i8",
                "attention_i8_cache")
F16_MAX = float(np.finfo(np.float16).max)


class HalfPrecisionError(LLMOptError):
    """The module cannot run in fp16 as it is."""


def _half_weight(store: WeightStore, name: str):
    def load():
        array = store.get(name)
        if np.abs(array).max(initial=0.0) > F16_MAX:
            raise HalfPrecisionError(f"half-precision: weight {name!r} holds values beyond fp16's range "
                                     f"(|x| > {F16_MAX:g}).", "Build it in fp32 (leave out --dtype fp16).")
        return array.astype(np.float16)
    return load


@dataclass(frozen=True)
class HalfPrecision(Pass):
    """Store float weights in f16 and compute activations and the KV cache in f16; logits stay f32."""

    name = "half-precision"
    activations: str = HALF

    def __post_init__(self):
        if self.activations not in (HALF, FULL):
            raise LLMOptError(f"half-precision: activations={self.activations!r} is not f16 or f32.",
                              "activations=f16 computes in f16 (GPUs); activations=f32 halves the weights only.")

    def apply(self, module: Module) -> PassResult:
        if module.meta.get("dtype") in (HALF, HALF_WEIGHTS):
            raise HalfPrecisionError("half-precision: the module is already fp16.", "Run the pass once.")
        if self.activations == FULL:
            return self._halve_weights(module)
        self._check(module)
        quant_parameters = _quantization_parameters(module)
        store, stats = _halved_store(module, lambda name: name not in quant_parameters)
        functions = {}
        for name, func in module.functions.items():
            functions[name], counts = self.rewrite_function(func, store.type)
            stats.update(counts)
        meta = {**module.meta, "dtype": HALF}
        if "kv_cache" in meta:
            meta["kv_cache"] = {**meta["kv_cache"], "dtype": HALF}
        return PassResult(Module(functions, store, meta), dict(stats))

    def _halve_weights(self, module: Module) -> PassResult:
        """The weights-only mode: f16 linear weights and embedding tables, f32 everything else."""
        reads = weight_reads(module)
        halved = {name for name, how in reads.items()
                  if module.weights.type(name).dtype == FULL and module.weights.type(name).rank == 2
                  and how <= WIDENED_READS}
        store, stats = _halved_store(module, halved.__contains__)
        functions = {}
        for fname, func in module.functions.items():
            weight_of = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}

            def replace(node, b, rename):
                if node.op == "weight" and node.attr["name"] in halved:
                    return b.add("weight", type=store.type(node.attr["name"]), source=node.source,
                                 created_by=node.created_by, **node.attr)
                if node.op == "embedding" and weight_of.get(node.inputs[1]) in halved:
                    rows = b.add("embedding", *renamed(node, rename), created_by=node.created_by, **node.attr)
                    stats["casts"] += 1
                    return b.add("cast", rows, dtype=FULL)
                return None

            functions[fname] = rebuild(func, replace, self.name)
        return PassResult(Module(functions, store, {**module.meta, "dtype": HALF_WEIGHTS}), dict(stats))

    @staticmethod
    def _check(module: Module) -> None:
        if module.meta.get("kv_cache", {}).get("dtype", FULL) != FULL:
            raise HalfPrecisionError(
                f"half-precision: the KV cache is {module.meta['kv_cache']['dtype']}; an fp16 model keeps an fp16 cache.",
                "Leave out the int8 KV cache (quantize-kv-cache) when building with --dtype fp16.")
        for func in module.functions.values():
            for node in func.nodes:
                if node.op in F32_ONLY_OPS:
                    raise HalfPrecisionError(
                        f"half-precision: @{func.name} %{node.name} = {node.op} (from {node.source or 'unknown'}) "
                        "is an int8-activation op, defined for f32 only.",
                        "Use a weight-only scheme (e.g. --quant w4g128) with --dtype fp16, or build W8A8 in fp32.")

    def rewrite_function(self, func: Function, type_of_weight) -> tuple[Function, Counter]:
        b, stats = Builder(func.name, created_by=self.name), Counter()
        rename = {}
        for p in func.params:
            rename[p.name] = b.param(p.name, _halved(p.type))
            stats["values"] += p.type.dtype == FULL
        for node in func.nodes:
            with b.at(source=node.source):
                rename[node.name] = self._emit(b, node, renamed(node, rename), type_of_weight)
            stats["values"] += node.type.dtype == FULL
        for name, value in func.outputs:
            new = rename[value]
            if name in KEPT_FULL_OUTPUTS and b.types[new].dtype == HALF:
                with b.at(source=func.node_map()[value].source if value in func.node_map() else ""):
                    new = b.add("cast", new, dtype=FULL)
                stats["casts"] += 1
            b.output(name, new)
        return b.finish(), stats

    @staticmethod
    def _emit(b: Builder, node: Node, inputs: tuple[str, ...], type_of_weight) -> str:
        attrs = node.attr
        if node.op in ("constant", "cast") and attrs.get("dtype") == FULL:
            attrs = {**attrs, "dtype": HALF}
        elif node.op == "dequantize" and node.type.dtype == FULL:
            attrs = {**attrs, "dtype": HALF}
        if node.op == "weight":
            return b.add("weight", type=type_of_weight(attrs["name"]), **attrs)
        type = _halved(node.type)
        return b.add(node.op, *inputs, type=type, created_by=node.created_by, **attrs)


def _halved_store(module: Module, halve) -> tuple[WeightStore, Counter]:
    """A store with the f32 weights ``halve(name)`` selects as f16 (the others as they are)."""
    store, stats = WeightStore(), Counter()
    for name in module.weight_names():
        entry = module.weights.entry(name)
        if entry.type.dtype == FULL and halve(name):
            store.add(name, entry.type.with_dtype(HALF), _half_weight(module.weights, name), entry.origin)
            stats["weights"] += 1
        else:
            store.add(name, entry.type, entry.load, entry.origin)
    return store, stats


def _quantization_parameters(module: Module) -> set[str]:
    """Weights a ``dequantize`` reads (codes, f32 scales and zeros): they keep their dtypes."""
    names = set()
    for func in module.functions.values():
        nodes = func.node_map()
        for node in func.nodes:
            if node.op == "dequantize":
                names.update(nodes[i].attr["name"] for i in node.inputs if i in nodes and nodes[i].op == "weight")
    return names


def _halved(type):
    return type.with_dtype(HALF) if type.dtype == FULL else type


__all__ = ["HalfPrecision", "HalfPrecisionError"]
