"""Reads the text the printer writes (``parse(print(m)) == m``). Errors name the line."""

from __future__ import annotations

import ast
import json
import re

from .graph import Function, Module, Node, Param, freeze_attrs
from .printer import HEADER
from .types import parse_type
from .weights import WeightStore

_FUNC = re.compile(r"^func @([\w.\-]+)\((.*)\) \{$")
_NODE_HEAD = re.compile(r"^%([\w.\-]+) = ([\w.\-]+)\(([^)]*)\)(?: \{(.*)\})?$")
_WEIGHT_HEAD = re.compile(r"^%([\w.\-]+) = weight @(\S+)$")
_PROVENANCE = re.compile(r"^(?:from=(\S+))?\s*(?:by=(\S+))?$")


class IRParseError(ValueError):
    def __init__(self, line_no: int, line: str, message: str):
        super().__init__(f"IR line {line_no}: {message}\n    {line.strip()}")
        self.line_no = line_no


def _parse_attrs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except (MemoryError, RecursionError):  # Python's parser gives up on very deep nesting
        raise ValueError("attributes nested too deeply") from None
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def _parse_values(text: str) -> tuple[str, ...]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if not name.startswith("%"):
            raise ValueError(f"operand {name!r} should be a %value")
    return tuple(n[1:] for n in names)


def parse_node(line: str) -> Node:
    body, source, created_by = line.strip(), "", ""
    if "  # " in body:
        body, comment = body.rsplit("  # ", 1)
        match = _PROVENANCE.match(comment.strip())
        if not match:
            raise ValueError(f"bad provenance comment {comment!r}")
        source, created_by = match.group(1) or "", match.group(2) or ""
    head, sep, type_text = body.rpartition(" : ")
    if not sep:
        raise ValueError("missing ' : type'")
    weight = _WEIGHT_HEAD.match(head)
    if weight:
        return Node(weight.group(1), "weight", (), freeze_attrs({"name": weight.group(2)}), parse_type(type_text),
                    source, created_by)
    match = _NODE_HEAD.match(head)
    if not match:
        raise ValueError("expected '%name = op(%a, %b) {attrs} : type'")
    name, op, args, attrs = match.groups()
    return Node(name, op, _parse_values(args), freeze_attrs(_parse_attrs(attrs)), parse_type(type_text),
                source, created_by)


def _parse_params(text: str) -> list[Param]:
    params = []
    for part in re.split(r",\s*(?=%)", text.strip()) if text.strip() else []:
        name, _, type_text = part.partition(":")
        params.append(Param(name.strip().lstrip("%"), parse_type(type_text)))
    return params


def _parse_outputs(text: str) -> list[tuple[str, str]]:
    outputs = []
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if not value.startswith("%"):
            raise ValueError(f"bad output {part.strip()!r}: expected name=%value")
        outputs.append((name, value[1:]))
    return outputs


def parse_module(text: str, weights: WeightStore | None = None) -> Module:
    """Parse IR text. Weights are not in the text: pass the store the graph refers to."""
    functions: dict[str, Function] = {}
    meta: dict = {}
    current: Function | None = None
    lines = text.splitlines()
    for line_no, line in enumerate(lines, 1):
        stripped = line.strip()
        try:
            if not stripped or (stripped.startswith("#") and current is None):
                continue
            if current is None:
                if stripped.startswith("meta "):
                    meta = json.loads(stripped[5:])
                    if not isinstance(meta, dict):
                        raise ValueError("meta must be a JSON object")
                    continue
                match = _FUNC.match(stripped)
                if not match:
                    raise ValueError("expected 'func @name(...) {' or 'meta {...}'")
                current = Function(match.group(1), _parse_params(match.group(2)), [], [])
            elif stripped == "}":
                functions[current.name] = current
                current = None
            elif stripped.startswith("return"):
                current.outputs = _parse_outputs(stripped[len("return"):])
            else:
                current.nodes.append(parse_node(stripped))
        except (ValueError, SyntaxError, RecursionError) as err:  # RecursionError: JSON nested too deeply
            raise IRParseError(line_no, line, str(err)) from None
    if current is not None:
        raise IRParseError(len(lines), lines[-1] if lines else "", f"function @{current.name} is not closed")
    if lines and lines[0].strip() != HEADER:
        raise IRParseError(1, lines[0], f"expected the header {HEADER!r}")
    return Module(functions, weights if weights is not None else WeightStore(), meta)
