"""``quantize-kv-cache``: keep the KV cache as int8 codes with one f32 scale per (token, kv head).

Option: ``bits`` (only 8 for now).

Requires: verified IR following the decoder's cache convention (``frontend/decoder.py``):
``module.meta["kv_cache"]`` names ``layers`` with an f32 cache; an entry point that stores the cache
(``prefill``) outputs ``k.i``/``v.i`` f32[1, T, kv_heads, head_dim]; one that extends it
(``decode``) takes cache buffers ``k.i``/``v.i`` f32[1, capacity, kv_heads, head_dim] and outputs
``k.i``/``v.i`` = ``kv_write(param, new, pos)``; entry points without a cache (``logits``) are left alone.

Guarantees: every cache tensor crossing an entry point becomes two: the codes ``k.i``
i8[1, T, kv_heads, head_dim] and the scales ``k.i.scale`` f32[1, T, kv_heads] (the same for ``v``),
each right after the other in params and outputs, so the cache of a layer is ``k.i, k.i.scale,
v.i, v.i.scale`` (``module.meta["kv_cache"]["tensors"]``, with ``dtype`` "i8"). The scale of a row
is ``row_scale_i8`` (max |x| over head_dim / 127) and its codes ``quantize_rows_i8``
(round half to even). Only the stored cache is quantized: the tokens an entry point computes
itself are attended in f32. Decode writes the new token's codes and scale into the buffers
(``kv_write``: past codes are carried, never re-quantized) and attends with
``attention_i8_cache``: over the dequantized past and the new token's own rows in f32, reading the
codes (no dequantized copy of the cache is made). Should another node read a written cache, that
one is dequantized whole and the new token's f32 row written over its own.
New nodes carry ``created_by="quantize-kv-cache"`` and the ``source`` of the node they follow.

Stats: ``stored`` cache tensors quantized at an output, ``loaded`` cache params read as codes,
``fused_attention`` attentions reading the codes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ...errors import LLMOptError
from ...ir.graph import Builder, Function, Module, Node
from ...ir.types import TensorType
from ..base import Pass, PassResult, map_functions
from ..rewrite import renamed

F32_CACHE_TENSORS = ["k.{i}", "v.{i}"]  # what a cache without "tensors" in its meta holds per layer
I8_CACHE_TENSORS = ["k.{i}", "k.{i}.scale", "v.{i}", "v.{i}.scale"]
SCALE_SUFFIX = ".scale"

_HINT = ("Run quantize-kv-cache on a decoder built by llmopt's frontends (prefill/decode with the k.i/v.i "
         "cache), once, before any pass that restructures the cache.")


class KVCacheConventionError(LLMOptError):
    """The module's KV cache is not the decoder's f32 ``k.i``/``v.i`` cache."""


def _cache_names(module: Module) -> set[str]:
    info = module.meta.get("kv_cache")
    if not info:
        raise KVCacheConventionError("quantize-kv-cache: the module has no KV cache (no meta kv_cache).", _HINT)
    if info.get("dtype") != "f32" or info.get("tensors", F32_CACHE_TENSORS) != F32_CACHE_TENSORS:
        raise KVCacheConventionError(
            f"quantize-kv-cache: the KV cache is already {info.get('dtype')} with tensors "
            f"{info.get('tensors', F32_CACHE_TENSORS)}; the pass quantizes an f32 k.i/v.i cache.", _HINT)
    return {f"{role}.{i}" for i in range(info["layers"]) for role in ("k", "v")}


def _check_cache_type(func: Function, what: str, type: TensorType) -> None:
    if type.dtype != "f32" or type.rank != 4 or type.shape[0] != 1:
        raise KVCacheConventionError(f"quantize-kv-cache: @{func.name} {what} is {type}, not "
                                     "f32[1, tokens, kv_heads, head_dim].", _HINT)


def _check_convention(func: Function, names: set[str], params: set[str], outputs: dict[str, str]) -> None:
    """Raise unless ``func`` stores (no cache params) or extends (params = outputs) the whole cache."""
    if set(outputs) != names or (params and params != names):
        raise KVCacheConventionError(
            f"quantize-kv-cache: @{func.name} takes cache params {sorted(params)} and returns cache outputs "
            f"{sorted(outputs)}; expected none and all of {sorted(names)}, or all of them as both.", _HINT)
    types, nodes = func.types(), func.node_map()
    for name, value in outputs.items():
        _check_cache_type(func, f"output {name}", types[value])
        if params:
            node = nodes.get(value)
            if node is None or node.op != "kv_write" or node.inputs[0] != name:
                raise KVCacheConventionError(f"quantize-kv-cache: @{func.name} output {name} is not "
                                             f"kv_write(%{name}, new, pos).", _HINT)


@dataclass(frozen=True)
class QuantizeKVCache(Pass):
    """Store the KV cache as int8 codes plus per-(token, kv head) f32 scales; dequantize the past on use."""

    name = "quantize-kv-cache"
    bits: int = 8

    def __post_init__(self):
        if self.bits != 8:
            raise LLMOptError(f"quantize-kv-cache: bits={self.bits} is not supported.",
                              "Only bits=8 (int8 codes, one f32 scale per token and kv head) exists for now.")

    def apply(self, module: Module) -> PassResult:
        names = _cache_names(module)
        result = map_functions(module, lambda func: self.rewrite_function(func, names))
        meta = {**module.meta, "kv_cache": {**module.meta["kv_cache"], "dtype": "i8", "tensors": I8_CACHE_TENSORS}}
        return PassResult(Module(result.module.functions, module.weights, meta), result.stats)

    def rewrite_function(self, func: Function, names: set[str]) -> tuple[Function, Counter]:
        params = {p.name for p in func.params if p.name in names}
        outputs = {name: value for name, value in func.outputs if name in names}
        if not params and not outputs:
            return func, Counter()
        _check_convention(func, names, params, outputs)
        b = Builder(func.name, created_by=self.name)
        rename, past = {}, {}  # past: cache param -> (codes, scales) params
        for p in func.params:
            if p.name in params:
                _check_cache_type(func, f"param {p.name}", p.type)
                past[p.name] = (b.param(p.name, p.type.with_dtype("i8")),
                                b.param(p.name + SCALE_SUFFIX, TensorType("f32", p.type.shape[:-1])))
            else:
                rename[p.name] = b.param(p.name, p.type)
        stored_at = {}  # value -> cache outputs it is
        for name, value in outputs.items():
            stored_at.setdefault(value, []).append(name)
        fused, dequantized = self.fusable_attentions(func, stored_at) if params else (set(), set())
        stored, written = {}, {}  # cache output -> (codes, scales); written cache -> (codes, scales, new rows)
        for node in func.nodes:
            with b.at(source=node.source):
                names = stored_at.get(node.name, ())
                if names and params:  # decode: write codes and scales
                    codes, scales = self.write(b, node, rename, past[node.inputs[0]])
                    written[node.name] = (codes, scales, rename[node.inputs[1]])
                    if node.name in dequantized:  # read by more than attention: the whole cache in f32
                        rows = b.add("dequantize_rows_i8", codes, scales)
                        rename[node.name] = b.add("kv_write", rows, *(rename[i] for i in node.inputs[1:]))
                    stored.update({name: (codes, scales) for name in names})
                    continue
                if node.name in fused:  # attend over the codes: no dequantized cache
                    q, keys, values, pos = node.inputs
                    rename[node.name] = b.add("attention_i8_cache", rename[q], *written[keys], *written[values],
                                              rename[pos], **node.attr)
                    continue
                rename[node.name] = b.copy_node(node, renamed(node, rename))
                for name in names:
                    stored[name] = self.quantize(b, rename[node.name])
        for name, value in func.outputs:
            if name in stored:
                b.output(name, stored[name][0])
                b.output(name + SCALE_SUFFIX, stored[name][1])
            else:
                b.output(name, rename[value])
        return b.finish(), Counter(stored=len(stored), loaded=len(past), fused_attention=len(fused))

    @staticmethod
    def fusable_attentions(func: Function, written: dict[str, list[str]]) -> tuple[set[str], set[str]]:
        """(attention nodes that become ``attention_i8_cache``, written caches still needed in f32).

        ``written``: the written caches (kv_write values) -> the cache outputs they are. An
        ``attention(q, k, v, pos)`` fuses when ``k`` and ``v`` are caches written at ``pos``; a
        written cache any other node reads, or an output other than its cache names returns, is
        dequantized as a whole for it."""
        nodes = func.node_map()
        fused = {n.name for n in func.nodes if n.op == "attention" and len(n.inputs) == 4
                 and all(i in written and nodes[i].inputs[2] == n.inputs[3] for i in n.inputs[1:3])}
        dequantized = {i for n in func.nodes if n.name not in fused for i in n.inputs if i in written}
        dequantized |= {value for name, value in func.outputs if value in written and name not in written[value]}
        return fused, dequantized

    @staticmethod
    def quantize(b: Builder, value: str) -> tuple[str, str]:
        """(codes, scales) of the rows of ``value``."""
        scales = b.add("row_scale_i8", value)
        return b.add("quantize_rows_i8", value, scales), scales

    def write(self, b: Builder, node: Node, rename: dict[str, str], buffers: tuple[str, str]) -> tuple[str, str]:
        """The codes and scales buffers with the new rows of ``kv_write`` ``node`` written in."""
        codes, scales = self.quantize(b, rename[node.inputs[1]])
        pos = rename[node.inputs[2]]
        return b.add("kv_write", buffers[0], codes, pos), b.add("kv_write", buffers[1], scales, pos)
