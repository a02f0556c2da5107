"""The IR's data structures: SSA nodes in functions, functions in a module.

A ``Node`` is immutable: one op applied to named input values, with typed attributes, a result
type and provenance (``source``: where the frontend found it; ``created_by``: the pass that made
it). A ``Function`` lists its nodes in a topological order. Passes never edit a function in
place: they build a new one with a ``Builder`` (see ``passes/rewrite.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from .types import TensorType

AttrValue = Any  # int | float | str | bool | None | tuple of those


def freeze_attrs(attrs: dict[str, AttrValue]) -> tuple[tuple[str, AttrValue], ...]:
    """Attributes as a sorted tuple of pairs (hashable; lists become tuples)."""
    def freeze(value):
        if isinstance(value, list):
            return tuple(freeze(v) for v in value)
        if isinstance(value, tuple):
            return tuple(freeze(v) for v in value)
        return value
    return tuple(sorted((k, freeze(v)) for k, v in attrs.items() if v is not None))


@dataclass(frozen=True)
class Node:
    """``%name = op(inputs) {attrs} : type``. Inputs are names of params or earlier nodes."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: tuple[tuple[str, AttrValue], ...]
    type: TensorType
    source: str = ""
    created_by: str = ""

    @property
    def attr(self) -> dict[str, AttrValue]:
        return dict(self.attrs)

    def structure(self) -> tuple:
        """What the node computes, without its name and provenance (the key CSE uses)."""
        return (self.op, self.inputs, self.attrs, self.type)


@dataclass(frozen=True)
class Param:
    name: str
    type: TensorType


@dataclass
class Function:
    """One entry point (``prefill``, ``decode``, ``forward``): params, nodes in order, named outputs."""

    name: str
    params: list[Param]
    nodes: list[Node]
    outputs: list[tuple[str, str]]  # (output name, value name)

    def types(self) -> dict[str, TensorType]:
        env = {p.name: p.type for p in self.params}
        env.update((n.name, n.type) for n in self.nodes)
        return env

    def node_map(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def users(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                users.setdefault(name, []).append(node)
        return users

    def weight_names(self) -> list[str]:
        return [n.attr["name"] for n in self.nodes if n.op == "weight"]


@dataclass
class Module:
    """Functions that share weights by name, plus the model description (config, tokenizer)."""

    functions: dict[str, Function]
    weights: Any  # llmopt.ir.weights.WeightStore; kept untyped to avoid an import cycle
    meta: dict[str, Any] = field(default_factory=dict)

    def __eq__(self, other) -> bool:  # weights are compared by what the graph references
        return (isinstance(other, Module) and self.functions == other.functions
                and self.meta == other.meta)

    def weight_names(self) -> list[str]:
        """Every weight referenced by any function, first use first."""
        seen: dict[str, None] = {}
        for func in self.functions.values():
            seen.update(dict.fromkeys(func.weight_names()))
        return list(seen)


class Builder:
    """Builds a ``Function`` node by node, inferring each result type from the op registry.

    ``with builder.at(source="model.layers.0.mlp")`` sets the provenance of the nodes built
    inside; ``created_by`` names the pass doing the building.
    """

    def __init__(self, name: str, created_by: str = ""):
        self.name = name
        self.params: list[Param] = []
        self.nodes: list[Node] = []
        self.outputs: list[tuple[str, str]] = []
        self.types: dict[str, TensorType] = {}
        self.created_by = created_by
        self.source = ""
        self._counter = 0

    def param(self, name: str, type: TensorType) -> str:
        if name in self.types:
            raise ValueError(f"value %{name} defined twice")
        self.params.append(Param(name, type))
        self.types[name] = type
        return name

    @contextlib.contextmanager
    def at(self, source: str | None = None, created_by: str | None = None) -> Iterator[None]:
        saved = self.source, self.created_by
        self.source = self.source if source is None else source
        self.created_by = self.created_by if created_by is None else created_by
        try:
            yield
        finally:
            self.source, self.created_by = saved

    def fresh_name(self) -> str:
        while str(self._counter) in self.types:
            self._counter += 1
        name = str(self._counter)
        self._counter += 1
        return name

    def add(self, op: str, *inputs: str, type: TensorType | None = None, source: str | None = None,
            created_by: str | None = None, result: str | None = None, **attrs: AttrValue) -> str:
        """Append ``op(inputs) {attrs}`` and return the new value's name."""
        from .ops import infer_type  # the registry imports graph types; import here to avoid a cycle
        for value in inputs:
            if value not in self.types:
                raise ValueError(f"{op}: input %{value} is not defined yet")
        frozen = freeze_attrs(attrs)
        if type is None:
            type = infer_type(op, [self.types[v] for v in inputs], dict(frozen))
        node = Node(result or self.fresh_name(), op, tuple(inputs), frozen, type,
                    self.source if source is None else source,
                    self.created_by if created_by is None else created_by)
        if node.name in self.types:
            raise ValueError(f"value %{node.name} defined twice")
        self.nodes.append(node)
        self.types[node.name] = type
        return node.name

    def weight(self, weight_name: str, type: TensorType, source: str | None = None) -> str:
        """A reference to the external weight ``weight_name`` (its data stays in the WeightStore)."""
        return self.add("weight", type=type, source="" if source is None else source, name=weight_name)

    def copy_node(self, node: Node, inputs: tuple[str, ...]) -> str:
        """Re-emit ``node`` with renamed inputs, keeping its op, attrs, type and provenance."""
        new = Node(self.fresh_name(), node.op, inputs, node.attrs, node.type, node.source, node.created_by)
        self.nodes.append(new)
        self.types[new.name] = new.type
        return new.name

    def output(self, name: str, value: str) -> None:
        if value not in self.types:
            raise ValueError(f"output {name}: %{value} is not defined")
        self.outputs.append((name, value))

    def finish(self) -> Function:
        return Function(self.name, list(self.params), list(self.nodes), list(self.outputs))


def weight_reads(module: Module, reader_ops=None) -> dict[str, set[tuple[str, int]]]:
    """weight name -> {(op, operand index)} over every function; a function output is ("output", 0).
    ``reader_ops(func)``, if given, maps node names of ``func`` to the op names their reads are
    recorded under instead of their own op (codegen's fused readers, codegen/weight_layout.py)."""
    reads: dict[str, set[tuple[str, int]]] = {}
    for func in module.functions.values():
        weights = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
        renamed_ops = reader_ops(func) if reader_ops is not None else {}
        for node in func.nodes:
            for op in renamed_ops.get(node.name, (node.op,)):
                for index, value in enumerate(node.inputs):
                    if value in weights:
                        reads.setdefault(weights[value], set()).add((op, index))
        for _, value in func.outputs:
            if value in weights:
                reads.setdefault(weights[value], set()).add(("output", 0))
    return reads
