"""Re-emit a function node by node, letting a callback substitute nodes: the core of every rewrite.

``rebuild(func, replace, created_by)`` walks ``func.nodes`` in order with a fresh ``Builder``.
For each node it calls ``replace(node, builder, rename)``, where ``rename`` maps old value names
to new ones. The callback returns:

- ``None``: keep the node (it is copied with renamed inputs and its own provenance);
- a value name: the node's value is now that value (one the callback just built, or an existing
  one, e.g. the node CSE merged it into);
- ``DROP``: the node disappears; a later node that still reads it is an error.

Nodes the callback builds get ``created_by`` and, by default, the ``source`` of the node being
replaced. The builder names nodes ``0, 1, 2, ...`` in order (params keep their names), so a
rebuilt function's text form is canonical: the same graph always prints the same way.
"""

from __future__ import annotations

from typing import Callable, Union

from ..ir.graph import Builder, Function, Node


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()

Replace = Callable[[Node, Builder, dict[str, str]], Union[str, None, _Drop]]


class RewriteError(ValueError):
    """A rewrite left a function reading a value it dropped."""


def renamed(node: Node, rename: dict[str, str]) -> tuple[str, ...]:
    """``node``'s inputs under ``rename``."""
    try:
        return tuple(rename[name] for name in node.inputs)
    except KeyError as missing:
        raise RewriteError(f"%{node.name} = {node.op} reads %{missing.args[0]}, which the rewrite dropped") from None


def rebuild(func: Function, replace: Replace, created_by: str) -> Function:
    """A new function: ``func`` with each node kept, substituted or dropped by ``replace``."""
    builder = Builder(func.name, created_by=created_by)
    rename = {p.name: builder.param(p.name, p.type) for p in func.params}
    for node in func.nodes:
        with builder.at(source=node.source):
            new = replace(node, builder, rename)
        if new is None:
            rename[node.name] = builder.copy_node(node, renamed(node, rename))
        elif new is not DROP:
            rename[node.name] = new
    for name, value in func.outputs:
        if value not in rename:
            raise RewriteError(f"@{func.name}: output {name} = %{value} was dropped by the rewrite")
        builder.output(name, rename[value])
    return builder.finish()
