"""``fuse-linears``: horizontal fusion of linears that read the same input.

Requires: verified IR. A group is made of ``min_group`` or more ``linear`` nodes that read the same
input value (hence share its dtype), all with a bias or all without, each of static output width,
whose weight and bias operands are ``weight`` nodes or values defined before the group's first
linear (q/k/v projections, gate/up projections).

Guarantees: at the group's first linear, the group becomes

    %w = concat(%w_a, %w_b, ..., axis=0)          # and the same for biases
    %y = linear(%x, %w[, %b])
    %y_a = slice(%y, axis=-1, start=0, end=n_a)    # one per original linear, in order

and every use of an original linear reads its slice. The concat, the fused linear and the slices
are ``created_by="fuse-linears"``; the concat and the linear take the common dotted prefix of the
members' sources (``model.layers.0.self_attn``), each slice its linear's source. Weight nodes of
later members are re-emitted before the concat. The concat of weights is left in the graph:
``fold-constants`` turns it into one stored weight and ``dce`` then drops the separate weight nodes
(the default pipeline is ``fuse-linears, fold-constants, cse, dce``).

Stats: ``groups`` fused and ``linears_fused`` (linears replaced).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..errors import LLMOptError
from ..ir.graph import Builder, Function, Module, Node
from .base import Pass, PassResult, map_functions
from .rewrite import rebuild


def common_source(sources: list[str]) -> str:
    """Longest common dotted prefix: ``a.b.q_proj``, ``a.b.k_proj`` -> ``a.b``."""
    parts = [s.split(".") for s in sources]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def find_groups(func: Function, min_group: int) -> list[list[Node]]:
    """Groups of linears to fuse, each in node order; groups ordered by their first linear."""
    nodes, position = func.node_map(), {n.name: i for i, n in enumerate(func.nodes)}
    by_input: dict[tuple, list[Node]] = {}
    for node in func.nodes:
        if node.op == "linear" and isinstance(node.type.shape[-1], int):
            by_input.setdefault((node.inputs[0], len(node.inputs)), []).append(node)
    def readable_at(value: str, index: int) -> bool:  # a param, a weight (re-emitted), or defined earlier
        return value not in nodes or nodes[value].op == "weight" or position[value] < index

    groups = []
    for members in by_input.values():
        first = position[members[0].name]
        members = [m for m in members if all(readable_at(v, first) for v in m.inputs[1:])]
        if len(members) >= min_group:
            groups.append(members)
    return groups


@dataclass(frozen=True)
class FuseLinears(Pass):
    """Fuse linears sharing an input into one linear over concatenated weights, plus slices."""

    name = "fuse-linears"
    min_group: int = 2

    def __post_init__(self):
        if self.min_group < 2:
            raise LLMOptError(f"fuse-linears: min_group={self.min_group} is too small.",
                              "A group needs at least 2 linears; use min_group=2 or more.")

    def apply(self, module: Module) -> PassResult:
        return map_functions(module, self.rewrite_function)

    def rewrite_function(self, func: Function) -> tuple[Function, Counter]:
        groups = find_groups(func, self.min_group)
        at_first = {g[0].name: g for g in groups}
        nodes = func.node_map()
        replaced: dict[str, str] = {}  # original linear -> its slice

        def operand(value: str, b: Builder, rename: dict[str, str]) -> str:
            if value not in rename:  # a later member's weight node, emitted early
                rename[value] = b.copy_node(nodes[value], ())
            return rename[value]

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            if node.name in rename:  # a weight node already emitted for a group
                return rename[node.name]
            if node.name in replaced:
                return replaced[node.name]
            group = at_first.get(node.name)
            if group is None:
                return None
            with b.at(source=common_source([m.source for m in group])):
                operands = [[operand(v, b, rename) for v in m.inputs[1:]] for m in group]
                fused_args = [b.add("concat", *column, axis=0) for column in zip(*operands)]
                fused = b.add("linear", rename[node.inputs[0]], *fused_args)
            start = 0
            for member in group:
                width = member.type.shape[-1]
                with b.at(source=member.source):
                    replaced[member.name] = b.add("slice", fused, axis=-1, start=start, end=start + width)
                start += width
            return replaced[node.name]

        new = rebuild(func, replace, self.name)
        return new, Counter(groups=len(groups), linears_fused=sum(len(g) for g in groups))
