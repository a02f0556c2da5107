"""What changed between two modules, node by node: ``diff_modules(a, b)`` and its text form.

Nodes are matched in two rounds, per function:

1. **Structural identity.** Walking B in order, a B node matches an unmatched A node that computes
   the same thing: same op, attrs and type, and inputs that are matched to each other (params match
   by name; weight nodes by weight name, which is an attr). This is hash-consing across the two
   graphs: value names and node order do not matter, so a pass that renumbers, reorders or rebuilds
   a function leaves everything it did not touch "same".
2. **Provenance.** Every node left over is paired with a left-over node of the other side having the
   same op and the same ``source`` (``from=``), preferring the one with the same type, then the
   same attrs, then the most inputs matched, then the earliest. Such a pair is *rewritten*: its
   lines say which of inputs (by slot, with the op defining each value: ``input 0: %q (linear) ->
   %6 (slice)`` shows what replaced what), attrs, type (shape and dtype) changed. A pair that turns out
   identical under the final matching (it only read a rewritten value that is now matched) is same.

What is still unmatched is *removed* (only in A) or *added* (only in B). Params, outputs and the
weights the functions reference are compared by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .graph import Function, Module, Node
from .printer import format_attrs, format_node
from .types import TensorType


@dataclass(frozen=True)
class NodeChange:
    """``kind`` is "added" (``after`` only), "removed" (``before`` only) or "rewritten" (both)."""

    kind: str
    before: Node | None
    after: Node | None
    details: tuple[str, ...] = ()


@dataclass
class FunctionDiff:
    name: str
    same: int
    changes: list[NodeChange]  # in display order: B's order, removed nodes where they stood in A
    params: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(c.kind == kind for c in self.changes)


@dataclass
class IRDiff:
    functions: list[FunctionDiff]
    functions_added: list[str]
    functions_removed: list[str]
    weights_added: list[tuple[str, TensorType]]
    weights_removed: list[tuple[str, TensorType]]
    weights_retyped: list[tuple[str, TensorType, TensorType]]

    @property
    def empty(self) -> bool:
        return not (self.functions_added or self.functions_removed or self.weights_added or self.weights_removed
                    or self.weights_retyped or any(f.changes or f.params or f.outputs for f in self.functions))

    def render(self) -> str:
        return render_diff(self)


def _match(a: Function, b: Function) -> tuple[dict[str, str], dict[str, Node]]:
    """B value -> A value for every matched value, and the provenance-paired B nodes."""
    to_a = {p.name: p.name for p in b.params if p.name in {q.name for q in a.params}}
    free: dict[tuple, list[Node]] = {}
    for node in a.nodes:
        free.setdefault((node.op, node.attrs, node.type, node.inputs), []).append(node)
    left: list[Node] = []
    for node in b.nodes:
        inputs = tuple(to_a.get(i) for i in node.inputs)
        candidates = free.get((node.op, node.attrs, node.type, inputs)) if None not in inputs else None
        if candidates:
            to_a[node.name] = candidates.pop(0).name
        else:
            left.append(node)
    matched_a = set(to_a.values())
    by_origin: dict[tuple[str, str], list[Node]] = {}
    for node in a.nodes:
        if node.name not in matched_a:
            by_origin.setdefault((node.op, node.source), []).append(node)
    position = {n.name: i for i, n in enumerate(a.nodes)}
    paired: dict[str, Node] = {}
    for node in left:
        pool = by_origin.get((node.op, node.source), [])
        if not pool:
            continue
        def score(old: Node) -> tuple:
            same_inputs = sum(to_a.get(i) == j for i, j in zip(node.inputs, old.inputs))
            return (old.type != node.type, old.attrs != node.attrs, -same_inputs, position[old.name])
        best = min(pool, key=score)
        pool.remove(best)
        to_a[node.name] = best.name
        paired[node.name] = best
    return to_a, paired


def _value(name: str, nodes: dict[str, Node]) -> str:
    """``%5 (linear)``: a value and the op defining it (``param`` for a param)."""
    return f"%{name} ({nodes[name].op if name in nodes else 'param'})"


def _details(old: Node, new: Node, to_a: dict[str, str], a_nodes: dict[str, Node],
             b_nodes: dict[str, Node]) -> tuple[str, ...]:
    details = []
    if len(old.inputs) != len(new.inputs):
        details.append(f"inputs ({', '.join(_value(i, a_nodes) for i in old.inputs)}) -> "
                       f"({', '.join(_value(j, b_nodes) for j in new.inputs)})")
    else:
        details += [f"input {slot}: {_value(i, a_nodes)} -> {_value(j, b_nodes)}"
                    for slot, (i, j) in enumerate(zip(old.inputs, new.inputs)) if to_a.get(j) != i]
    if old.attrs != new.attrs:
        details.append(f"attrs{format_attrs(old.attrs) or ' {}'} ->{format_attrs(new.attrs) or ' {}'}")
    if old.type.dtype != new.type.dtype:
        details.append(f"dtype {old.type.dtype} -> {new.type.dtype}")
    if old.type.shape != new.type.shape:
        details.append(f"shape {list(old.type.shape)} -> {list(new.type.shape)}".replace("'", ""))
    return tuple(details)


def diff_functions(a: Function, b: Function) -> FunctionDiff:
    to_a, paired = _match(a, b)
    matched_a = set(to_a.values())
    a_position = {n.name: i for i, n in enumerate(a.nodes)}
    a_nodes, b_nodes = a.node_map(), b.node_map()
    removed = [n for n in a.nodes if n.name not in matched_a]
    changes: list[NodeChange] = []
    same = 0

    def flush_removed(before: int) -> None:
        while removed and a_position[removed[0].name] < before:
            changes.append(NodeChange("removed", removed.pop(0), None))

    for node in b.nodes:
        if node.name in to_a:
            flush_removed(a_position[to_a[node.name]])
        old = paired.get(node.name)
        details = _details(old, node, to_a, a_nodes, b_nodes) if old is not None else ()
        if node.name not in to_a:
            changes.append(NodeChange("added", None, node))
        elif details:
            changes.append(NodeChange("rewritten", old, node, details))
        else:
            same += 1
    flush_removed(len(a.nodes))

    a_params, b_params = {p.name: p.type for p in a.params}, {p.name: p.type for p in b.params}
    params = [f"- %{n}: {t}" for n, t in a_params.items() if n not in b_params]
    params += [f"+ %{n}: {t}" for n, t in b_params.items() if n not in a_params]
    params += [f"~ %{n}: {a_params[n]} -> {t}" for n, t in b_params.items() if n in a_params and a_params[n] != t]
    a_outputs, b_outputs = dict(a.outputs), dict(b.outputs)
    outputs = [f"- {n}=%{v}" for n, v in a_outputs.items() if n not in b_outputs]
    outputs += [f"+ {n}=%{v}" for n, v in b_outputs.items() if n not in a_outputs]
    outputs += [f"~ {n}=%{a_outputs[n]} -> %{v}" for n, v in b_outputs.items()
                if n in a_outputs and to_a.get(v) != a_outputs[n]]
    return FunctionDiff(b.name, same, changes, params, outputs)


def _weight_types(module: Module) -> dict[str, TensorType]:
    return {n.attr["name"]: n.type for f in module.functions.values() for n in f.nodes if n.op == "weight"}


def diff_modules(a: Module, b: Module) -> IRDiff:
    """The changes that turn ``a`` into ``b`` (weights are compared by the names the graphs reference)."""
    functions = [diff_functions(a.functions[name], f) for name, f in b.functions.items() if name in a.functions]
    wa, wb = _weight_types(a), _weight_types(b)
    return IRDiff(functions,
                  functions_added=[n for n in b.functions if n not in a.functions],
                  functions_removed=[n for n in a.functions if n not in b.functions],
                  weights_added=[(n, t) for n, t in wb.items() if n not in wa],
                  weights_removed=[(n, t) for n, t in wa.items() if n not in wb],
                  weights_retyped=[(n, wa[n], t) for n, t in wb.items() if n in wa and wa[n] != t])


def _summary(func: FunctionDiff) -> str:
    counts = [f"{func.same} same"] + [f"{func.count(k)} {k}" for k in ("rewritten", "removed", "added")]
    return f"@{func.name}: " + ", ".join(counts)


def render_diff(diff: IRDiff) -> str:
    """The diff as text: ``-`` removed, ``+`` added, ``~`` rewritten (old line, then ``>`` the new one)."""
    lines = [f"+ func @{n}" for n in diff.functions_added] + [f"- func @{n}" for n in diff.functions_removed]
    for func in diff.functions:
        lines.append(_summary(func))
        lines += [f"  params {p}" for p in func.params] + [f"  return {o}" for o in func.outputs]
        for change in func.changes:
            if change.kind == "removed":
                lines.append(f"  - {format_node(change.before)}")
            elif change.kind == "added":
                lines.append(f"  + {format_node(change.after)}")
            else:
                lines.append(f"  ~ {format_node(change.before)}")
                lines.append(f"  > {format_node(change.after)}")
                lines += [f"      {d}" for d in change.details]
    if diff.weights_added or diff.weights_removed or diff.weights_retyped:
        lines.append("weights:")
        lines += [f"  - @{n} : {t}" for n, t in diff.weights_removed]
        lines += [f"  + @{n} : {t}" for n, t in diff.weights_added]
        lines += [f"  ~ @{n} : {old} -> {new}" for n, old, new in diff.weights_retyped]
    if diff.empty:
        lines.append("no changes")
    return "\n".join(lines) + "\n"
