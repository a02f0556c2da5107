"""A function's graph as one self-contained HTML page (inline SVG, no external tools or scripts).

Layout is layered: a node's layer is one more than the deepest node it reads; nodes without inputs
(weights, constants), params and values from outside the shown subset sit just above their first
reader, so a decoder draws tall and narrow. The nodes of a layer are ordered by the mean position
of their inputs in the layer above (one barycenter sweep), the others after them. Each box shows ``%name = op``, the type, and ``from=``/``by=``;
hovering shows the node's full IR line. ``source_prefix`` keeps only nodes whose ``source`` (or weight name) is
that prefix or starts with it plus a dot (``model.layers.1`` does not take ``model.layers.10``). The
function's params, and values the subset reads from outside it, are drawn as dashed stubs.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from .graph import Function, Node
from .printer import format_node

BOX_W, BOX_H, GAP_X, GAP_Y, STUB_H = 260, 58, 24, 46, 26
BOLD = ' font-weight="bold"'
OP_COLORS = {"weight": "#e8eef7", "linear": "#fde9c8", "matmul": "#fde9c8", "attention": "#f9d6d5",
             "rms_norm": "#dcf0dc", "rope": "#efe1f7", "embedding": "#e8eef7", "constant": "#f0f0f0"}


def select_nodes(func: Function, source_prefix: str | None = None) -> list[Node]:
    """The nodes shown: all, or those whose source (for a weight: source or weight name) is
    ``source_prefix`` or lies under it."""
    if not source_prefix:
        return list(func.nodes)
    def under(name: str) -> bool:
        return name == source_prefix or name.startswith(source_prefix + ".")
    return [n for n in func.nodes if under(n.source) or (n.op == "weight" and under(n.attr["name"]))]


def _layers(nodes: list[Node], stubs: list[str]) -> list[list[str]]:
    sources = set(stubs) | {n.name for n in nodes if not n.inputs}  # weights, constants, params, stubs
    depth: dict[str, int] = {}
    for node in nodes:
        if node.name not in sources:
            depth[node.name] = 1 + max((depth[i] for i in node.inputs if i not in sources), default=0)
    first_use: dict[str, int] = {}
    for node in nodes:
        for value in node.inputs:
            if value in sources:
                first_use[value] = min(first_use.get(value, depth[node.name]), depth[node.name])
    for name in list(stubs) + [n.name for n in nodes if not n.inputs]:  # just above their first reader
        depth[name] = max(first_use.get(name, 1) - 1, 0)
    layers: list[list[str]] = [[] for _ in range(max(depth.values(), default=0) + 1)]
    for name, level in depth.items():
        layers[level].append(name)
    inputs = {n.name: n.inputs for n in nodes}
    for above, layer in zip(layers, layers[1:]):
        slot = {name: i for i, name in enumerate(above)}
        def barycenter(name: str) -> float:
            placed = [slot[i] for i in inputs.get(name, ()) if i in slot]
            return sum(placed) / len(placed) if placed else float(len(above))
        layer.sort(key=barycenter)
    return [layer for layer in layers if layer]


def render_svg(func: Function, source_prefix: str | None = None) -> str:
    """The SVG drawing: one ``<g class="node">`` per shown node, one ``<g class="param">`` per param
    read, one ``<g class="stub">`` per value read from outside the subset."""
    nodes = select_nodes(func, source_prefix)
    shown = {n.name for n in nodes}
    stubs = list(dict.fromkeys(i for n in nodes for i in n.inputs if i not in shown))
    layers = _layers(nodes, stubs)
    width = max(len(layer) for layer in layers) * (BOX_W + GAP_X) + GAP_X if layers else 2 * GAP_X
    position: dict[str, tuple[float, float]] = {}
    for row, layer in enumerate(layers):
        offset = (width - len(layer) * (BOX_W + GAP_X) + GAP_X) / 2
        for column, name in enumerate(layer):
            position[name] = (offset + column * (BOX_W + GAP_X), GAP_Y / 2 + row * (BOX_H + GAP_Y))
    height = len(layers) * (BOX_H + GAP_Y) + GAP_Y / 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'font-family="monospace" font-size="11">',
             '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
             'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="#777"/></marker></defs>']
    for node in nodes:
        x, y = position[node.name]
        for value in node.inputs:
            ux, uy = position[value]
            top = uy + (STUB_H if value in stubs else BOX_H)
            mid = (top + y) / 2
            parts.append(f'<path class="edge" d="M{ux + BOX_W / 2:.1f},{top:.1f} C{ux + BOX_W / 2:.1f},{mid:.1f} '
                         f'{x + BOX_W / 2:.1f},{mid:.1f} {x + BOX_W / 2:.1f},{y:.1f}" fill="none" stroke="#999" '
                         f'marker-end="url(#arrow)"/>')
    params = {p.name: p.type for p in func.params}
    for name in stubs:
        x, y = position[name]
        kind, label = ("param", f"%{name}: {params[name]}") if name in params else ("stub", f"%{name} (outside)")
        parts.append(f'<g class="{kind}"><rect x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{STUB_H}" rx="13" '
                     f'fill="#fff" stroke="#aaa" stroke-dasharray="4 3"/><text x="{x + 10:.1f}" y="{y + 17:.1f}">'
                     f'{escape(label)}</text></g>')
    for node in nodes:
        x, y = position[node.name]
        head = f"%{node.name} = {node.op}" + (f" @{node.attr['name']}" if node.op == "weight" else "")
        provenance = " ".join(f"{k}={v}" for k, v in (("from", node.source), ("by", node.created_by)) if v)
        lines = [head, str(node.type), provenance]
        texts = "".join(f'<text x="{x + 8:.1f}" y="{y + 16 + 16 * i:.1f}"{BOLD if i == 0 else ""}>'
                        f'{escape(_clip(line))}</text>' for i, line in enumerate(lines) if line)
        parts.append(f'<g class="node" data-name="{escape(node.name)}"><title>{escape(format_node(node))}</title>'
                     f'<rect x="{x:.1f}" y="{y:.1f}" width="{BOX_W}" height="{BOX_H}" rx="4" '
                     f'fill="{OP_COLORS.get(node.op, "#ffffff")}" stroke="#555"/>{texts}</g>')
    parts.append("</svg>")
    return "\n".join(parts)


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def render_html(func: Function, source_prefix: str | None = None) -> str:
    """A standalone page holding the drawing of ``func`` (or of its ``source_prefix`` subset)."""
    count = len(select_nodes(func, source_prefix))
    title = f"@{func.name}" + (f" — {source_prefix}" if source_prefix else "")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{escape(title)}</title>'
            '<style>body{margin:12px;font-family:sans-serif} .node:hover rect{stroke:#d33;stroke-width:2}</style>'
            f'</head><body><h3>{escape(title)}: {count} nodes</h3>\n{render_svg(func, source_prefix)}\n</body></html>\n')


def write_graph(func: Function, path: str | Path, source_prefix: str | None = None) -> int:
    """Write the page to ``path``; returns the number of nodes drawn."""
    Path(path).write_text(render_html(func, source_prefix), encoding="utf-8")
    return len(select_nodes(func, source_prefix))
