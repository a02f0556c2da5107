"""How each IR op becomes Relax: one small function per op, in one table.

A lowering gets the ``LoweringContext`` (block builder, symbolic dims, target), the node and its
lowered inputs, and returns the Relax expression of the result. Ops with no good Relax op (rope,
the causal mask) are written as TE computes; ``linear`` goes through the target's kernel, and a
``dequantize`` that the target's quantized-linear kernel and embeddings absorb
(codegen/quant_fusion.py) lowers to nothing: the linears reading it pass its operands to that
kernel, and an ``embedding`` of a ``dequantize`` (absorbed or not) gathers the rows its ids pick
from the packed codes, scales and zeros (IR or blocked layout) and dequantizes only those rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tvm
from tvm import relax, te, tirx, topi

from ..ir.graph import Node
from ..ir.rope import rope_attrs_inv_freq
from ..ir.types import TVM_DTYPES, Dim
from .kernels.quant_linear_te import dequantized_weight
from .quant_fusion import dequantize_scheme


@dataclass
class LoweringContext:
    bb: relax.BlockBuilder
    symbols: dict[str, tirx.Var]
    emit_linear: Callable  # (bb, x, w, bias, out_features=None) -> relax.Expr
    # (bb, q, k, v, heads=, kv_heads=, head_dim=, scale=, causal=, pos=[, i8_cache=]); None: Relax ops.
    # i8_cache: (k_scale, k_new, v_scale, v_new) of an attention_i8_cache with one query, k/v its codes
    emit_attention: Callable | None
    types: dict  # IR value name -> TensorType, for lowerings that need their inputs' types
    packed: set = frozenset()  # IR values (weights) held in the target's packed linear layout
    emit_quant_linear: Callable | None = None  # see TargetSpec.emit_quant_linear
    fused: set = frozenset()  # dequantize nodes never materialized (codegen/quant_fusion.py)
    memo: dict = field(default_factory=dict)  # values a lowering computes once per function
    dequantized: dict = field(default_factory=dict)  # dequantize node -> its lowered parts (FusedDequantize)

    def dim(self, dim: Dim):
        """An IR dim as a TIR expression (ints stay ints)."""
        if isinstance(dim, int):
            return dim
        expr = 0
        for term in str(dim).split("+"):
            term = term.strip()
            expr = expr + (int(term) if term.lstrip("-").isdigit() else self.symbol(term))
        return expr

    def symbol(self, name: str) -> tirx.Var:
        if name not in self.symbols:
            self.symbols[name] = tirx.Var(name, "int64")
        return self.symbols[name]


class AbsorbedWeight:
    """What an absorbed weight-producing node (``dequantize``, ``densify``) lowers to: not a value;
    the linears (and embeddings) reading it take its operands. Others than FusedDequantize
    implement ``emit_linear(ctx, x, bias)`` (codegen/lower_sparse.py)."""


@dataclass(frozen=True)
class FusedDequantize(AbsorbedWeight):
    """What an absorbed ``dequantize`` lowers to: not a value, its operands for the linear kernel
    and the embedding gather."""

    node: Node
    operands: tuple  # lowered packed, scales[, zeros]


Lowering = Callable[[LoweringContext, Node, list], relax.Expr]
LOWERINGS: dict[str, Lowering] = {}


def lowers(*ops: str):
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = fn
        return fn
    return register


_BINARY = {"add": relax.op.add, "sub": relax.op.subtract, "mul": relax.op.multiply,
           "div": relax.op.divide, "maximum": relax.op.maximum, "minimum": relax.op.minimum}
_UNARY = {"neg": relax.op.negative, "exp": relax.op.exp, "sqrt": relax.op.sqrt, "rsqrt": relax.op.rsqrt,
          "tanh": relax.op.tanh, "sin": relax.op.sin, "cos": relax.op.cos, "sigmoid": relax.op.sigmoid,
          "relu": relax.op.nn.relu}

for _name, _fn in _BINARY.items():
    LOWERINGS[_name] = lambda ctx, node, args, fn=_fn: fn(args[0], args[1])
for _name, _fn in _UNARY.items():
    LOWERINGS[_name] = lambda ctx, node, args, fn=_fn: fn(args[0])


@lowers("gelu")
def _gelu(ctx, node, args):
    return relax.op.nn.gelu_tanh(args[0]) if node.attr.get("approximate") == "tanh" else relax.op.nn.gelu(args[0])


@lowers("pow")
def _pow(ctx, node, args):
    return relax.op.power(args[0], relax.const(node.attr["exponent"], TVM_DTYPES[node.type.dtype]))


@lowers("constant")
def _constant(ctx, node, args):
    return relax.const(node.attr["value"], TVM_DTYPES[node.attr["dtype"]])


@lowers("cast")
def _cast(ctx, node, args):
    return relax.op.astype(args[0], TVM_DTYPES[node.attr["dtype"]])


@lowers("sum", "mean", "max")
def _reduce(ctx, node, args):
    fn = {"sum": relax.op.sum, "mean": relax.op.mean, "max": relax.op.max}[node.op]
    return fn(args[0], axis=list(node.attr["axes"]), keepdims=node.attr.get("keepdims", False))


@lowers("softmax")
def _softmax(ctx, node, args):
    return relax.op.nn.softmax(args[0], axis=node.attr["axis"])


@lowers("reshape")
def _reshape(ctx, node, args):
    return relax.op.reshape(args[0], [ctx.dim(d) for d in node.attr["shape"]])


@lowers("transpose")
def _transpose(ctx, node, args):
    return relax.op.permute_dims(args[0], list(node.attr["perm"]))


@lowers("concat")
def _concat(ctx, node, args):
    return relax.op.concat(args, axis=node.attr["axis"])


@lowers("slice")
def _slice(ctx, node, args):
    a = node.attr
    axis = a["axis"] % node.type.rank  # TVM's strided_slice rejects negative axes
    return relax.op.strided_slice(args[0], axes=[axis], begin=[a["start"]], end=[a["end"]])


def _take_last_te(x: te.Tensor, axis: int):
    """The last entry along ``axis`` (kept, of size 1): a gather with a static result shape (a
    strided slice gives a symbolic one that FuseOps cannot type once a cast follows)."""
    shape = [1 if i == axis else d for i, d in enumerate(x.shape)]
    last = x.shape[axis] - 1
    return te.compute(shape, lambda *i: x(*[last if a == axis else v for a, v in enumerate(i)]), name="take_last")


@lowers("take_last")
def _take_last(ctx, node, args):
    axis = node.attr["axis"] % node.type.rank
    return ctx.bb.emit_te(_take_last_te, args[0], axis, primfunc_name_hint="take_last")


@lowers("matmul")
def _matmul(ctx, node, args):
    return relax.op.matmul(args[0], args[1])


def _take_packed_te(table: te.Tensor, ids: te.Tensor, vocab: int):
    """Rows of a table stored as [ceil(V/B), K, B] (table[v, k] = packed[v // B, k, v % B])."""
    block = table.shape[2]

    def value(*index):
        row = tirx.max(tirx.min(ids[index[:-1]], vocab - 1), 0)
        return table[tirx.floordiv(row, block), index[-1], tirx.floormod(row, block)]

    return te.compute(tuple(ids.shape) + (table.shape[1],), value, name="take_packed")


class _Rows:
    """A part ``[N, C]`` of a quantized table indexed ``[row, column]``, whether it is stored as the
    IR says or blocked (``[ceil(N/B), C, B]``, codegen/weight_layout.py)."""

    def __init__(self, tensor: te.Tensor, blocked: bool):
        self.tensor, self.blocked = tensor, blocked

    def __getitem__(self, index):
        row, column = index
        if not self.blocked:
            return self.tensor[row, column]
        block = self.tensor.shape[2]
        return self.tensor[tirx.floordiv(row, block), column, tirx.floormod(row, block)]


def _gather_dequantize_te(ids: te.Tensor, packed: te.Tensor, scales: te.Tensor, *rest: te.Tensor, scheme,
                          vocab: int, in_features: int, blocked: tuple[bool, ...]):
    """``dequantize(packed, scales[, zeros])[ids]`` reading only the rows ``ids`` pick (clipped to
    the table, as ``take`` does): ``rest`` is the zero points when the scheme has them, then the
    codebook table when it has one; ``blocked[i]``: part ``i`` is stored blocked."""
    parts = [_Rows(t, b) for t, b in zip((packed, scales, *rest), blocked)]
    zeros = parts[2] if scheme.has_zeros else None
    codebook = rest[-1] if scheme.codebook is not None else None
    value = dequantized_weight(scheme, in_features, parts[0], parts[1], zeros, codebook)

    def gathered(*index):
        return value(tirx.max(tirx.min(ids[index[:-1]], vocab - 1), 0), index[-1])

    return te.compute(tuple(ids.shape) + (in_features,), gathered, name="gather_dequantize")


def _gather_dequantize(ctx, node, ids, parts: FusedDequantize):
    """An embedding of a quantized table: gather the rows of its parts, dequantize only those."""
    scheme, vocab, in_features = dequantize_scheme(parts.node)
    tables = [relax.const(np.asarray(scheme.codebook, np.float32))] if scheme.codebook is not None else []
    blocked = tuple(value in ctx.packed for value in parts.node.inputs) + (False,) * len(tables)
    compute = functools.partial(_gather_dequantize_te, scheme=scheme, vocab=vocab, in_features=in_features,
                                blocked=blocked)
    return ctx.bb.emit_te(compute, ids, *parts.operands, *tables, primfunc_name_hint="gather_dequantize")


@lowers("embedding")
def _embedding(ctx, node, args):
    if node.inputs[1] in ctx.dequantized:
        return _gather_dequantize(ctx, node, args[0], ctx.dequantized[node.inputs[1]])
    if node.inputs[1] in ctx.packed:
        vocab = ctx.types[node.inputs[1]].shape[0]
        return ctx.bb.emit_te(_take_packed_te, args[1], args[0], vocab, primfunc_name_hint="take_packed")
    return relax.op.take(args[1], args[0], axis=0, mode="clip")


def widened(ctx, value):
    """``value`` as f32 if it is f16: f16 ops compute in f32 (the IR's f16 semantics); the node's
    result is rounded back to f16 by the lowering driver (relax_module._as_ir_dtype)."""
    if value.ty.dtype != "float16":
        return value
    return ctx.bb.emit(relax.op.astype(value, "float32"))


@lowers("rms_norm")
def _rms_norm(ctx, node, args):
    x, weight = (widened(ctx, a) for a in args)
    return relax.op.nn.rms_norm(x, weight, axes=[-1], epsilon=node.attr["eps"])


@lowers("linear")
def _linear(ctx, node, args):
    bias = args[2] if len(args) == 3 else None
    if isinstance(args[1], AbsorbedWeight) and not isinstance(args[1], FusedDequantize):
        return args[1].emit_linear(ctx, args[0], bias)
    if isinstance(args[1], FusedDequantize):
        packed, scales, *zeros = args[1].operands
        scheme, out_features, in_features = dequantize_scheme(args[1].node)
        return ctx.emit_quant_linear(ctx.bb, args[0], packed, scales, zeros[0] if zeros else None, bias,
                                     scheme, out_features, in_features)
    if node.inputs[1] in ctx.packed:
        return ctx.emit_linear(ctx.bb, args[0], args[1], bias, out_features=node.type.shape[-1])
    return ctx.emit_linear(ctx.bb, args[0], args[1], bias)


def _dequantize_te(packed: te.Tensor, scales: te.Tensor, *rest: te.Tensor, scheme, in_features: int):
    """f32 [N, K] from packed codes (the ``dequantize`` op, materialized): ``rest`` is the zero
    points when the scheme has them, then the codebook table when it has one."""
    zeros = rest[0] if scheme.has_zeros else None
    codebook = rest[-1] if scheme.codebook is not None else None
    value = dequantized_weight(scheme, in_features, packed, scales, zeros, codebook)
    return te.compute((packed.shape[0], in_features), value, name="dequantize")


@lowers("dequantize")
def _dequantize(ctx, node, args):
    ctx.dequantized[node.name] = FusedDequantize(node, tuple(args))  # what an embedding gathers from
    if node.name in ctx.fused:
        return ctx.dequantized[node.name]
    scheme, _, in_features = dequantize_scheme(node)
    tables = [relax.const(np.asarray(scheme.codebook, np.float32))] if scheme.codebook is not None else []
    # emit_te passes only TVM values on: the scheme goes in through partial
    compute = functools.partial(_dequantize_te, scheme=scheme, in_features=in_features)
    return ctx.bb.emit_te(compute, *args, *tables, primfunc_name_hint="dequantize")


def _rope_table_te(pos: te.Tensor, inv_freq: te.Tensor):
    """[2, seq, half]: cos and sin of pos * inv_freq, computed once per entry point."""
    def value(c, s, f):
        angle = tirx.Cast("float32", pos[s]) * inv_freq[f]
        return tirx.Select(c == 0, tirx.cos(angle), tirx.sin(angle))
    return te.compute((2, pos.shape[0], inv_freq.shape[0]), value, name="rope_table")


def _apply_rope_te(x: te.Tensor, table: te.Tensor):
    half = x.shape[-1] // 2

    def value(b, s, h, d):
        rotated = tirx.Select(d < half, -x[b, s, h, tirx.min(d + half, x.shape[-1] - 1)],
                              x[b, s, h, tirx.max(d - half, 0)])
        f = tirx.floormod(d, half)
        return x[b, s, h, d] * table[0, s, f] + rotated * table[1, s, f]

    return te.compute(x.shape, value, name="rope")


@lowers("rope")
def _rope(ctx, node, args):
    head_dim = node.type.shape[-1]
    key = ("rope_table", node.inputs[1], head_dim, node.attrs)
    if key not in ctx.memo:  # every layer's q and k share one table
        inv_freq = relax.const(rope_attrs_inv_freq(head_dim, node.attr).astype(np.float32))
        ctx.memo[key] = ctx.bb.emit_te(_rope_table_te, args[1], inv_freq, primfunc_name_hint="rope_table")
    return ctx.bb.emit_te(_apply_rope_te, widened(ctx, args[0]), ctx.memo[key], primfunc_name_hint="rope")


def _silu_te(x: te.Tensor):
    """x * sigmoid(x) with TVM's polynomial exp, which vectorizes (libm's expf does not)."""
    e = topi.fast_exp(topi.negative(x))
    return te.compute(x.shape, lambda *i: x(*i) / (tirx.const(1, x.dtype) + e(*i)), name="silu")


@lowers("silu")
def _silu(ctx, node, args):
    return ctx.bb.emit_te(_silu_te, widened(ctx, args[0]), primfunc_name_hint="silu")


def _causal_mask_te(scores: te.Tensor):
    """Additive mask for [b, heads, s, t] scores: queries sit at the end of the keys."""
    s, t = scores.shape[2], scores.shape[3]
    return te.compute(scores.shape, lambda b, h, i, j: tirx.Select(
        j > i + (t - s), scores[b, h, i, j] + tirx.const(-1e30, "float32"), scores[b, h, i, j]),
        name="causal_mask")


def _position_mask_te(scores: te.Tensor, pos: te.Tensor):
    """Additive mask for [b, heads, s, t] scores: query i sits at key position pos[i]."""
    return te.compute(scores.shape, lambda b, h, i, j: tirx.Select(
        j > pos[i].astype("int64"), scores[b, h, i, j] + tirx.const(-1e30, "float32"), scores[b, h, i, j]),
        name="position_mask")


@lowers("attention")
def _attention(ctx, node, args):
    return lower_attention(ctx, *args[:3], args[3] if len(args) == 4 else None, **attention_shape(ctx, node))


def attention_shape(ctx, node: Node) -> dict:
    """The keyword arguments of ``lower_attention`` (and of a target's ``emit_attention``) for an
    attention node (``attention``, ``attention_i8_cache``): heads, kv heads, head_dim, scale, causal."""
    return dict(heads=node.type.shape[2], kv_heads=ctx.types[node.inputs[1]].shape[2],
                head_dim=node.type.shape[3], scale=node.attr["scale"], causal=node.attr.get("causal", True))


def lower_attention(ctx, q, k, v, pos, *, heads, kv_heads, head_dim, scale, causal) -> relax.Expr:
    """``attention(q, k, v[, pos])``: the target's fused kernel, else Relax ops (matmul, mask, softmax)."""
    bb = ctx.bb
    half = q.ty.dtype == "float16"  # f16 scores and probabilities would lose too much: f32
    if ctx.emit_attention is not None:
        return ctx.emit_attention(bb, q, k, v, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                                  scale=scale, causal=causal, pos=pos)
    if heads != kv_heads:
        k = bb.emit(relax.op.repeat(k, heads // kv_heads, axis=2))
        v = bb.emit(relax.op.repeat(v, heads // kv_heads, axis=2))
    qh = bb.emit(relax.op.permute_dims(q, [0, 2, 1, 3]))
    kt = bb.emit(relax.op.permute_dims(k, [0, 2, 3, 1]))
    vh = bb.emit(relax.op.permute_dims(v, [0, 2, 1, 3]))
    scores = bb.emit(relax.op.multiply(relax.op.matmul(qh, kt, out_dtype="float32"),
                                       relax.const(scale, "float32")))
    if pos is not None and causal:
        scores = bb.emit_te(_position_mask_te, scores, pos, primfunc_name_hint="position_mask")
    elif causal:
        scores = bb.emit_te(_causal_mask_te, scores, primfunc_name_hint="causal_mask")
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    if half:  # f16 probabilities times f16 values, summed in f32
        probs = bb.emit(relax.op.astype(probs, "float16"))
    return relax.op.permute_dims(relax.op.matmul(probs, vh, out_dtype="float32"), [0, 2, 1, 3])


def unsupported(node: Node) -> str:
    return f"op {node.op!r} (from {node.source or 'unknown source'}) has no lowering to TVM"


__all__ = ["LOWERINGS", "AbsorbedWeight", "FusedDequantize", "LoweringContext", "unsupported"]

from . import lower_kv  # noqa: E402,F401 (registers the KV-cache lowerings)
from . import lower_int8  # noqa: E402,F401 (registers the int8 lowerings)
from . import lower_sparse  # noqa: E402,F401 (registers the densify lowering)
