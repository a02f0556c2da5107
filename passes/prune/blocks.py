"""Where a decoder's prunable structures are in one function, found by graph pattern: attention
blocks (q/k/v/o projections, the head reshapes, the KV cache params) and SwiGLU MLP blocks
(gate/up/down projections), so structured pruning can shrink them alike in every entry point.

The patterns are those ``frontend/decoder.py`` emits, before ``fuse-linears``::

    q = rope(reshape(linear(x, Wq[, bq]), (1, s, H, D)), pos)
    k = [extend(k_past,] rope(reshape(linear(x, Wk[, bk]), (1, s, KV, D)), pos) [)]
    v = [extend(v_past,] reshape(linear(x, Wv[, bv]), (1, s, KV, D)) [)]
    y = linear(reshape(attention(q, k, v[, pos]), (1, s, H*D)), Wo[, bo])

    y = linear(mul(silu(linear(x, Wg[, bg])), linear(x, Wu[, bu])), Wd[, bd])

Every weight and bias must be a ``weight`` node read by its projection only, every projection
output and head reshape read by the next node of the pattern only (the k/v values may also be
outputs: the cache). ``extend`` is how decode adds the new row to a cache param: ``concat(past,
new, axis=1)`` or ``kv_write(past, new, pos)``. Query head ``h`` attends with kv head
``h // (H / KV)`` (the ``attention`` op's grouping), so kv group ``g`` is kv head ``g`` and query
heads ``g*G .. g*G+G-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir.graph import Function, Node


@dataclass(frozen=True)
class Projection:
    """A linear reading stored weights: its value, weight name, bias name (or None), shape, provenance."""

    value: str
    weight: str
    bias: str | None
    out_features: int
    in_features: int
    source: str


@dataclass(frozen=True)
class AttentionBlock:
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    reshapes: tuple[str, str, str, str]  # the q, k, v head reshapes and the output reshape
    cache: tuple[str, str] | None  # the k/v cache params it extends (decode), else None
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def key(self) -> str:
        """Names the block in every function: its o_proj weight."""
        return self.o.weight

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.heads // self.kv_heads

    def projections(self) -> tuple[Projection, ...]:
        return self.q, self.k, self.v, self.o


@dataclass(frozen=True)
class MlpBlock:
    gate: Projection
    up: Projection
    down: Projection

    @property
    def key(self) -> str:
        """Names the block in every function: its down_proj weight."""
        return self.down.weight

    @property
    def intermediate(self) -> int:
        return self.down.in_features

    def projections(self) -> tuple[Projection, ...]:
        return self.gate, self.up, self.down


class _Graph:
    def __init__(self, func: Function):
        self.func = func
        self.nodes = func.node_map()
        self.users = func.users()
        self.outputs = {value for _, value in func.outputs}
        self.params = {p.name for p in func.params}

    def node(self, value: str, op: str) -> Node | None:
        node = self.nodes.get(value)
        return node if node is not None and node.op == op else None

    def only_reader(self, value: str, reader: str, may_be_output: bool = False) -> bool:
        users = self.users.get(value, [])
        return (len(users) == 1 and users[0].name == reader) and (may_be_output or value not in self.outputs)

    def projection(self, value: str) -> Projection | None:
        node = self.node(value, "linear")
        if node is None:
            return None
        stored = [self.node(name, "weight") for name in node.inputs[1:]]
        if any(w is None or not self.only_reader(w.name, node.name) for w in stored):
            return None
        weight = stored[0]
        if weight.type.rank != 2 or not all(isinstance(d, int) for d in weight.type.shape):
            return None
        return Projection(node.name, weight.attr["name"], stored[1].attr["name"] if len(stored) == 2 else None,
                          weight.type.shape[0], weight.type.shape[1], node.source)

    def heads(self, value: str, reader: str, may_be_output: bool = False) -> tuple[Projection, Node] | None:
        """``reshape(linear(...), (..., heads, head_dim))`` read only by ``reader``."""
        reshape = self.node(value, "reshape")
        if reshape is None or not self.only_reader(value, reader, may_be_output):
            return None
        proj = self.projection(reshape.inputs[0])
        shape = reshape.attr["shape"]
        if proj is None or not self.only_reader(proj.value, reshape.name) or len(shape) < 2 \
                or not all(isinstance(d, int) for d in shape[-2:]) or shape[-2] * shape[-1] != proj.out_features:
            return None
        return proj, reshape

    def roped(self, value: str, reader: str) -> tuple[Projection, Node] | None:
        rope = self.node(value, "rope")
        if rope is None or not self.only_reader(value, reader, may_be_output=True):
            return None
        return self.heads(rope.inputs[0], rope.name)

    def past(self, value: str, reader: str) -> tuple[str | None, str]:
        """``concat(param, new, axis=1)`` or ``kv_write(param, new, pos)`` -> (param, new); otherwise
        (None, value)."""
        node = self.nodes.get(value)
        extends = node is not None and (node.op == "kv_write" or (
            node.op == "concat" and len(node.inputs) == 2 and node.attr["axis"] in (1, -3)))
        if extends and node.inputs[0] in self.params and self.only_reader(value, reader, may_be_output=True):
            return node.inputs[0], node.inputs[1]
        return None, value

    def attention(self, node: Node) -> AttentionBlock | None:
        q_value, k_value, v_value = node.inputs[:3]
        k_past, k_new = self.past(k_value, node.name)
        v_past, v_new = self.past(v_value, node.name)
        if (k_past is None) != (v_past is None):
            return None
        q = self.roped(q_value, node.name)
        k = self.roped(k_new, k_value if k_past else node.name)
        v = self.heads(v_new, v_value if v_past else node.name, may_be_output=True)
        users = self.users.get(node.name, [])
        if q is None or k is None or v is None or len(users) != 1 or users[0].op != "reshape" \
                or node.name in self.outputs:
            return None
        out = users[0]
        o_users = self.users.get(out.name, [])
        o = self.projection(o_users[0].name) if len(o_users) == 1 and out.name not in self.outputs else None
        if o is None or self.nodes[o.value].inputs[0] != out.name:
            return None
        heads, head_dim = q[1].attr["shape"][-2:]
        kv_heads = k[1].attr["shape"][-2]
        if v[1].attr["shape"][-2:] != (kv_heads, head_dim) or k[1].attr["shape"][-1] != head_dim \
                or heads % kv_heads or o.in_features != heads * head_dim:
            return None
        cache = (k_past, v_past) if k_past else None
        return AttentionBlock(q[0], k[0], v[0], o, (q[1].name, k[1].name, v[1].name, out.name), cache,
                              heads, kv_heads, head_dim)

    def mlp(self, node: Node) -> MlpBlock | None:
        """``node`` is the ``mul`` of a SwiGLU MLP."""
        users = self.users.get(node.name, [])
        if len(users) != 1 or users[0].op != "linear" or users[0].inputs[0] != node.name or node.name in self.outputs:
            return None
        down = self.projection(users[0].name)
        for gate_side, up_side in (node.inputs, node.inputs[::-1]):
            silu = self.node(gate_side, "silu")
            if silu is None or not self.only_reader(gate_side, node.name):
                continue
            gate, up = self.projection(silu.inputs[0]), self.projection(up_side)
            if gate is None or up is None or down is None or not self.only_reader(gate.value, silu.name) \
                    or not self.only_reader(up.value, node.name) or gate.out_features != up.out_features \
                    or down.in_features != gate.out_features:
                continue
            return MlpBlock(gate, up, down)
        return None


def find_blocks(func: Function) -> tuple[list[AttentionBlock], list[MlpBlock]]:
    """The attention and MLP blocks of ``func`` matching the patterns above, in node order."""
    graph = _Graph(func)
    attention, mlp = [], []
    for node in func.nodes:
        if node.op == "attention":
            block = graph.attention(node)
            if block is not None:
                attention.append(block)
        elif node.op == "mul" and len(node.inputs) == 2:
            block = graph.mlp(node)
            if block is not None:
                mlp.append(block)
    return attention, mlp
