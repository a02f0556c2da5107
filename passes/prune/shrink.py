"""Shrink attention and MLP blocks to the kv groups and channels a structured pruning keeps, in every
function of a module alike.

For an attention block losing kv groups (``blocks.AttentionBlock``): q, k, v keep the rows of the
kept heads (kv group ``g``: kv head ``g``, query heads ``g*G .. g*G+G-1``, in their order), o_proj
the matching columns; the head reshapes take the new head counts, the output reshape the new width,
decode's cache params ``k.i``/``v.i`` the new kv head count. For an MLP block losing channels: gate
and up keep the kept rows, down the kept columns. With ``compensate``, o_proj / down_proj get the
bias ``b + W[:, removed] @ mean(X[removed])`` (FLaP's bias compensation: the removed channels'
mean contribution; ``b`` is the existing bias or 0, a new bias weight when there was none).

New weights are derived entries of a NEW WeightStore (the old ones kept until ``dce``), computed
from the originals when loaded: ``<weight>.pruned-structured``, the new bias of a linear without
one ``<linear>.bias.pruned-structured``. Nodes are re-emitted in order with their types re-inferred;
the new weight nodes and every node whose type or attributes changed are ``created_by`` the pass.
A function that reads a shrunk weight outside a recognized block is an error (nothing half-rewritten).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Builder, Function, Module
from ...ir.ops import OpError, infer_type
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from .blocks import AttentionBlock, MlpBlock, Projection, find_blocks
from .replace import derived_name
from .structure_plan import Removal

TAG = "structured"
_HINT = ("prune-structured shrinks decoders as llmopt's frontends build them; run it before fuse-linears "
         "and any quantization (llmopt build --prune flap:0.2 places it there).")


def kept_head_rows(block: AttentionBlock, removed: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Rows kept in q (and columns in o_proj), rows kept in k and v."""
    d, g = block.head_dim, block.group
    kept = [k for k in range(block.kv_heads) if k not in set(removed)]
    q = np.concatenate([np.arange(h * d, (h + 1) * d) for k in kept for h in range(k * g, (k + 1) * g)])
    kv = np.concatenate([np.arange(k * d, (k + 1) * d) for k in kept])
    return q, kv


def complement(kept: np.ndarray, size: int) -> np.ndarray:
    mask = np.ones(size, bool)
    mask[kept] = False
    return np.flatnonzero(mask)


class _Derived:
    """The new store and which source weight became which derived one."""

    def __init__(self, module: Module, pass_name: str):
        self.module, self.pass_name = module, pass_name
        self.store = WeightStore()
        for name in module.weights:
            entry = module.weights.entry(name)
            self.store.add(name, entry.type, entry.load, entry.origin)
        self.renamed: dict[str, str] = {}  # source weight -> derived weight
        self.new_bias: dict[str, str] = {}  # linear's weight -> the bias it gets (it had none)

    def add(self, name: str, shape: tuple[int, ...], load: Callable[[], np.ndarray], what: str) -> str:
        self.store.add(name, TensorType("f32", shape), lambda: np.ascontiguousarray(load(), np.float32),
                       origin=f"{self.pass_name}: {what}")
        return name

    def rows(self, source: str | None, rows: np.ndarray) -> None:
        if source is not None:
            shape = (len(rows),) + self.module.weights.type(source).shape[1:]
            self.renamed[source] = self.add(derived_name(source, TAG), shape,
                                            lambda: self.module.weights.get(source)[rows], f"{source}, kept rows")

    def projection_in(self, proj: Projection, kept: np.ndarray, mean: np.ndarray | None) -> None:
        """``proj`` keeps input columns ``kept``; with ``mean``, its bias compensates the others."""
        weights, source = self.module.weights, proj.weight
        self.renamed[source] = self.add(derived_name(source, TAG), (proj.out_features, len(kept)),
                                        lambda: weights.get(source)[:, kept], f"{source}, kept columns")
        if mean is None:
            return
        removed = complement(kept, proj.in_features)

        def bias() -> np.ndarray:
            w = weights.get(source)[:, removed].astype(np.float64)
            base = weights.get(proj.bias).astype(np.float64) if proj.bias else 0.0
            return base + w @ mean[removed]

        if proj.bias:
            self.renamed[proj.bias] = self.add(derived_name(proj.bias, TAG), (proj.out_features,), bias,
                                               f"{proj.bias} + compensation of removed inputs")
        else:
            name = derived_name(source.removesuffix(".weight") + ".bias", TAG)
            self.new_bias[source] = self.add(name, (proj.out_features,), bias,
                                             f"compensation of {source}'s removed inputs")


def shrink_module(module: Module, attention: list[AttentionBlock], mlp: list[MlpBlock], removal: Removal,
                  means: dict[str, np.ndarray] | None, pass_name: str) -> Module:
    """``module`` with ``removal`` applied (blocks found in one function, matched in all by key);
    ``means``: input means by block key for bias compensation (None: no compensation)."""
    derived = _Derived(module, pass_name)
    heads: dict[str, tuple[int, int]] = {}
    for block in attention:
        removed = removal.groups.get(block.key, ())
        if not removed:
            continue
        q_rows, kv_rows = kept_head_rows(block, removed)
        for source, rows in ((block.q.weight, q_rows), (block.q.bias, q_rows), (block.k.weight, kv_rows),
                             (block.k.bias, kv_rows), (block.v.weight, kv_rows), (block.v.bias, kv_rows)):
            derived.rows(source, rows)
        derived.projection_in(block.o, q_rows, None if means is None else means[block.key])
        heads[block.key] = ((block.kv_heads - len(removed)) * block.group, block.kv_heads - len(removed))
    for block in mlp:
        removed = removal.channels.get(block.key, ())
        if not removed:
            continue
        kept = complement(np.asarray(removed, int), block.intermediate)
        for source in (block.gate.weight, block.gate.bias, block.up.weight, block.up.bias):
            derived.rows(source, kept)
        derived.projection_in(block.down, kept, None if means is None else means[block.key])
    if not derived.renamed:
        return module
    shapes = {b.key: b for b in [*attention, *mlp]}
    functions = {name: _shrink_function(func, derived, heads, shapes, pass_name)
                 for name, func in module.functions.items()}
    return Module(functions, derived.store, _meta(module.meta, functions))


def _shrink_function(func: Function, derived: _Derived, heads: dict[str, tuple[int, int]],
                     planned: dict, pass_name: str) -> Function:
    attention, mlp = find_blocks(func)
    nodes = func.node_map()
    shapes: dict[str, tuple] = {}  # reshape value -> new shape
    params: dict[str, TensorType] = {}  # cache param -> new type
    bias_of: dict[str, str] = {}  # linear value -> the bias weight it gets
    covered: set[str] = set()
    for block in [*attention, *mlp]:
        if block.key not in planned:
            continue
        if [(p.weight, p.bias) for p in block.projections()] != \
                [(p.weight, p.bias) for p in planned[block.key].projections()]:
            raise LLMOptError(f"prune-structured: @{func.name} reads {block.key} in a block made of other "
                              "weights than in @prefill.", _HINT)
        covered.update(name for p in block.projections() for name in (p.weight, p.bias) if name)
        last = block.projections()[-1]
        if last.weight in derived.new_bias:
            bias_of[last.value] = derived.new_bias[last.weight]
        if isinstance(block, AttentionBlock) and block.key in heads:
            count, kv = heads[block.key]
            for value, n in zip(block.reshapes[:3], (count, kv, kv)):
                shape = nodes[value].attr["shape"]
                shapes[value] = tuple(shape[:-2]) + (n, shape[-1])
            out = nodes[block.reshapes[3]].attr["shape"]
            shapes[block.reshapes[3]] = tuple(out[:-1]) + (count * block.head_dim,)
            for param in block.cache or ():
                old = func.types()[param]
                params[param] = old.with_shape(old.shape[:2] + (kv,) + old.shape[3:])
    stray = sorted({n.attr["name"] for n in func.nodes if n.op == "weight"} & set(derived.renamed) - covered)
    if stray:
        raise LLMOptError(f"prune-structured: @{func.name} reads {', '.join(stray[:3])} outside an attention or "
                          "MLP block it recognizes, so it cannot shrink them consistently.", _HINT)

    b = Builder(func.name, created_by=pass_name)
    rename = {p.name: b.param(p.name, params.get(p.name, p.type)) for p in func.params}
    for node in func.nodes:
        inputs = [rename[name] for name in node.inputs]
        with b.at(source=node.source):
            if node.op == "weight":
                name = node.attr["name"]
                if name in derived.renamed:
                    new = derived.renamed[name]
                    rename[node.name] = b.add("weight", type=derived.store.type(new), name=new)
                else:
                    rename[node.name] = b.add("weight", type=node.type, created_by=node.created_by, **node.attr)
                continue
            attrs, changed = node.attr, False
            if node.name in shapes:
                attrs, changed = {**attrs, "shape": shapes[node.name]}, True
            if node.name in bias_of:
                bias = bias_of[node.name]
                inputs.append(b.add("weight", type=derived.store.type(bias), name=bias))
                changed = True
            try:
                type = infer_type(node.op, [b.types[name] for name in inputs], attrs)
            except OpError as error:
                raise LLMOptError(f"prune-structured: @{func.name} %{node.name} = {node.op} does not fit the "
                                  f"shrunk shapes: {error}", _HINT) from None
            changed = changed or type != node.type
            rename[node.name] = b.add(node.op, *inputs, type=type,
                                      created_by=pass_name if changed else node.created_by, **attrs)
    for name, value in func.outputs:
        b.output(name, rename[value])
    return b.finish()


def _meta(meta: dict, functions: dict[str, Function]) -> dict:
    """``meta`` with the per-layer shapes: ``kv_cache.layer_kv_heads`` (from prefill's ``k.i`` outputs,
    ``kv_heads`` becoming their maximum) and ``decoder.layers`` (heads, kv heads, intermediate size)."""
    meta = dict(meta)
    prefill = functions.get("prefill")
    if prefill is None:
        return meta
    types, outputs = prefill.types(), dict(prefill.outputs)
    info = meta.get("kv_cache")
    if info and all(f"k.{i}" in outputs for i in range(info["layers"])):
        kv = [int(types[outputs[f"k.{i}"]].shape[-2]) for i in range(info["layers"])]
        meta["kv_cache"] = {**info, "kv_heads": max(kv), "layer_kv_heads": kv}
    attention, mlp = find_blocks(prefill)
    if "decoder" in meta and len(attention) == len(mlp):
        meta["decoder"] = {**meta["decoder"], "layers": [
            {"num_heads": a.heads, "num_kv_heads": a.kv_heads, "intermediate_size": m.intermediate}
            for a, m in zip(attention, mlp)]}
    return meta
