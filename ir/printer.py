"""The IR's text form. One line per node:

    %3 = weight @model.layers.0.self_attn.q_proj.weight : f32[576, 576]
    %12 = linear(%11, %3) : f32[1, seq, 576]  # from=model.layers.0.self_attn.q_proj by=fuse-linears

Attributes print as Python keyword literals inside braces (``{eps=1e-05, shape=(1, 'seq')}``),
so the parser reads them back exactly (floats print with ``repr``, which round-trips).
"""

from __future__ import annotations

import json

from .graph import Function, Module, Node

HEADER = "# llmopt-ir v1"


def format_attrs(attrs) -> str:
    if not attrs:
        return ""
    return " {" + ", ".join(f"{k}={v!r}" for k, v in attrs) + "}"


def format_node(node: Node) -> str:
    if node.op == "weight":  # weights print as a reference: %3 = weight @model.norm.weight : f32[576]
        line = f"%{node.name} = weight @{node.attr['name']} : {node.type}"
    else:
        args = ", ".join(f"%{i}" for i in node.inputs)
        line = f"%{node.name} = {node.op}({args}){format_attrs(node.attrs)} : {node.type}"
    provenance = " ".join(f"{k}={v}" for k, v in (("from", node.source), ("by", node.created_by)) if v)
    return f"{line}  # {provenance}" if provenance else line


def format_function(func: Function) -> str:
    params = ", ".join(f"%{p.name}: {p.type}" for p in func.params)
    lines = [f"func @{func.name}({params}) {{"]
    lines += [f"  {format_node(n)}" for n in func.nodes]
    lines.append("  return " + ", ".join(f"{name}=%{value}" for name, value in func.outputs))
    lines.append("}")
    return "\n".join(lines)


def print_module(module: Module) -> str:
    lines = [HEADER]
    if module.meta:
        lines.append("meta " + json.dumps(module.meta, sort_keys=True))
    for func in module.functions.values():
        lines += ["", format_function(func)]
    return "\n".join(lines) + "\n"
