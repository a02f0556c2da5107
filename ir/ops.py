"""The op registry: every IR op with its inputs, attributes, type inference and numpy semantics.

The numpy functions are the executable definition of each op (the interpreter runs them); codegen
must agree with them. Types are inferred, never trusted: the verifier re-infers every node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import LLMOptError
from .quant_schemes import get_scheme
from .rope import rope_attrs_inv_freq
from .sparse_format import NMFormat
from .types import DTYPES, Dim, TensorType, add_dims, eval_dim

InferFn = Callable[[list[TensorType], dict], TensorType]
RefFn = Callable[[list[np.ndarray], dict, dict], np.ndarray]  # (args, attrs, symbol env)


class OpError(ValueError):
    """An op was applied to operands or attributes it does not accept."""


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: tuple[int, int]  # (min, max) inputs; max -1 = variadic
    infer: InferFn | None  # None: the type is given explicitly (weight)
    ref: RefFn | None
    attrs: tuple[str, ...] = ()  # required attributes
    optional_attrs: tuple[str, ...] = ()
    doc: str = ""
    pure: bool = True
    tags: frozenset = field(default_factory=frozenset)


OPS: dict[str, OpDef] = {}


def register(name: str, arity, infer, ref, attrs=(), optional_attrs=(), doc="", tags=()) -> OpDef:
    if name in OPS:
        raise ValueError(f"op {name!r} registered twice")
    if isinstance(arity, int):
        arity = (arity, arity)
    OPS[name] = OpDef(name, arity, infer, ref, tuple(attrs), tuple(optional_attrs), doc,
                      tags=frozenset(tags))
    return OPS[name]


def infer_type(op: str, types: list[TensorType], attrs: dict) -> TensorType:
    """The result type of ``op`` on operands of ``types``; raises OpError when they don't fit."""
    opdef = OPS.get(op)
    if opdef is None:
        raise OpError(f"unknown op {op!r}")
    low, high = opdef.arity
    if len(types) < low or (high >= 0 and len(types) > high):
        raise OpError(f"{op} takes {low}..{high if high >= 0 else 'n'} inputs, got {len(types)}")
    missing = [a for a in opdef.attrs if a not in attrs]
    if missing:
        raise OpError(f"{op} needs attribute(s) {', '.join(missing)}")
    unknown = [a for a in attrs if a not in opdef.attrs and a not in opdef.optional_attrs]
    if unknown:
        raise OpError(f"{op} has no attribute(s) {', '.join(unknown)}")
    if opdef.infer is None:
        raise OpError(f"{op} needs an explicit type")
    return opdef.infer(types, attrs)


# ---- shape helpers ----------------------------------------------------------------------------

def _norm_axis(axis: int, rank: int, op: str) -> int:
    if not -rank <= axis < max(rank, 1):
        raise OpError(f"{op}: axis {axis} out of range for rank {rank}")
    return axis % max(rank, 1)


def broadcast_shapes(a: tuple[Dim, ...], b: tuple[Dim, ...], op: str) -> tuple[Dim, ...]:
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + tuple(a)
    b = (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise OpError(f"{op}: shapes {a} and {b} do not broadcast")
    return tuple(out)


def _same_dtype(types: list[TensorType], op: str) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise OpError(f"{op}: operand dtypes differ: {sorted(dtypes)}")
    return dtypes.pop()


def _float(t: TensorType, op: str) -> None:
    if not t.dtype.startswith("f"):
        raise OpError(f"{op}: needs a float operand, got {t.dtype}")


# ---- elementwise ------------------------------------------------------------------------------

def _binary(name: str, fn) -> None:
    def infer(types, attrs):
        return TensorType(_same_dtype(types, name), broadcast_shapes(types[0].shape, types[1].shape, name))
    register(name, 2, infer, lambda args, attrs, env: fn(args[0], args[1]).astype(args[0].dtype),
             doc=f"elementwise {name} with numpy broadcasting", tags={"elementwise"})


def _unary(name: str, fn, float_only: bool = True, attrs=(), optional_attrs=()) -> None:
    def infer(types, attrs):
        if float_only:
            _float(types[0], name)
        return types[0]
    register(name, 1, infer, lambda args, a, env: fn(args[0], a).astype(args[0].dtype),
             attrs=attrs, optional_attrs=optional_attrs, doc=f"elementwise {name}", tags={"elementwise"})


_binary("add", np.add)
_binary("sub", np.subtract)
_binary("mul", np.multiply)
_binary("div", np.divide)
_binary("maximum", np.maximum)
_binary("minimum", np.minimum)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x, attrs):
    if attrs.get("approximate", "none") == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    from math import erf
    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


_unary("neg", lambda x, a: -x, float_only=False)
_unary("exp", lambda x, a: np.exp(x))
_unary("sqrt", lambda x, a: np.sqrt(x))
_unary("rsqrt", lambda x, a: 1.0 / np.sqrt(x))
_unary("tanh", lambda x, a: np.tanh(x))
_unary("sin", lambda x, a: np.sin(x))
_unary("cos", lambda x, a: np.cos(x))
_unary("sigmoid", lambda x, a: _sigmoid(x))
_unary("silu", lambda x, a: x * _sigmoid(x))
_unary("relu", lambda x, a: np.maximum(x, 0), float_only=False)
_unary("gelu", _gelu, optional_attrs=("approximate",))
_unary("pow", lambda x, a: np.power(x, a["exponent"]), attrs=("exponent",))


def _infer_constant(types, attrs):
    return TensorType(attrs["dtype"], ())


register("constant", 0, _infer_constant,
         lambda args, attrs, env: np.array(attrs["value"], dtype=DTYPES[attrs["dtype"]]),
         attrs=("value", "dtype"), doc="a scalar literal")


def _infer_cast(types, attrs):
    return types[0].with_dtype(attrs["dtype"])


register("cast", 1, _infer_cast, lambda args, attrs, env: args[0].astype(DTYPES[attrs["dtype"]]),
         attrs=("dtype",), doc="convert to dtype", tags={"elementwise"})

# ---- reductions -------------------------------------------------------------------------------


def _reduce(name: str, fn) -> None:
    def infer(types, attrs):
        t = types[0]
        axes = {_norm_axis(a, t.rank, name) for a in attrs["axes"]}
        keep = attrs.get("keepdims", False)
        shape = [1 if i in axes else d for i, d in enumerate(t.shape) if keep or i not in axes]
        return t.with_shape(shape)

    def ref(args, attrs, env):
        return fn(args[0], axis=tuple(attrs["axes"]), keepdims=attrs.get("keepdims", False)).astype(args[0].dtype)

    register(name, 1, infer, ref, attrs=("axes",), optional_attrs=("keepdims",), doc=f"{name} over axes")


_reduce("sum", np.sum)
_reduce("mean", np.mean)
_reduce("max", np.max)


def _softmax_ref(args, attrs, env):
    x = args[0]
    e = np.exp(x - x.max(axis=attrs["axis"], keepdims=True))
    return (e / e.sum(axis=attrs["axis"], keepdims=True)).astype(x.dtype)


def _infer_softmax(types, attrs):
    _float(types[0], "softmax")
    _norm_axis(attrs["axis"], types[0].rank, "softmax")
    return types[0]


register("softmax", 1, _infer_softmax, _softmax_ref, attrs=("axis",), doc="softmax along axis")

# ---- layout -----------------------------------------------------------------------------------


def _infer_reshape(types, attrs):
    t, shape = types[0], tuple(attrs["shape"])
    if t.is_static and all(isinstance(d, int) for d in shape):
        if int(np.prod(shape)) != t.numel():
            raise OpError(f"reshape: {t} has {t.numel()} elements, shape {shape} has {int(np.prod(shape))}")
    return t.with_shape(shape)


register("reshape", 1, _infer_reshape,
         lambda args, attrs, env: args[0].reshape([eval_dim(d, env) for d in attrs["shape"]]),
         attrs=("shape",), doc="reshape to shape (dims may be symbolic)")


def _infer_transpose(types, attrs):
    t, perm = types[0], tuple(attrs["perm"])
    if sorted(perm) != list(range(t.rank)):
        raise OpError(f"transpose: perm {perm} is not a permutation of rank {t.rank}")
    return t.with_shape([t.shape[p] for p in perm])


register("transpose", 1, _infer_transpose, lambda args, attrs, env: np.transpose(args[0], attrs["perm"]),
         attrs=("perm",), doc="permute axes")


def _infer_concat(types, attrs):
    dtype = _same_dtype(types, "concat")
    rank = types[0].rank
    axis = _norm_axis(attrs["axis"], rank, "concat")
    total: Dim = 0
    for t in types:
        if t.rank != rank or any(d != e for i, (d, e) in enumerate(zip(t.shape, types[0].shape)) if i != axis):
            raise OpError(f"concat: {t} does not match {types[0]} off axis {axis}")
        total = add_dims(total, t.shape[axis])
    shape = list(types[0].shape)
    shape[axis] = total
    return TensorType(dtype, tuple(shape))


register("concat", (1, -1), _infer_concat,
         lambda args, attrs, env: np.concatenate(args, axis=attrs["axis"]),
         attrs=("axis",), doc="concatenate along axis")


def _infer_slice(types, attrs):
    t = types[0]
    axis = _norm_axis(attrs["axis"], t.rank, "slice")
    start, end = attrs["start"], attrs["end"]
    dim = t.shape[axis]
    if not (0 <= start <= end) or (isinstance(dim, int) and end > dim):
        raise OpError(f"slice: [{start}:{end}] out of range for axis {axis} of {t}")
    shape = list(t.shape)
    shape[axis] = end - start
    return t.with_shape(shape)


def _slice_ref(args, attrs, env):
    index = [slice(None)] * args[0].ndim
    index[attrs["axis"]] = slice(attrs["start"], attrs["end"])
    return args[0][tuple(index)]


register("slice", 1, _infer_slice, _slice_ref, attrs=("axis", "start", "end"),
         doc="x[start:end] along axis (static bounds)")

# ---- linear algebra ---------------------------------------------------------------------------


def _infer_linear(types, attrs):
    x, w = types[0], types[1]
    if w.rank != 2 or x.shape[-1] != w.shape[1]:
        raise OpError(f"linear: x {x} and weight {w} (expected [out, {x.shape[-1]}]) do not fit")
    if len(types) == 3 and types[2].shape != (w.shape[0],):
        raise OpError(f"linear: bias {types[2]} should be [{w.shape[0]}]")
    if not (x.dtype == "f32" and w.dtype == "f16"):  # an f16 weight of an f32 linear is widened
        _same_dtype(types[:2], "linear")
    _same_dtype([x] + types[2:], "linear")
    return x.with_shape(x.shape[:-1] + (w.shape[0],))


def _linear_ref(args, attrs, env):
    y = np.matmul(args[0], args[1].T)
    return (y + args[2] if len(args) == 3 else y).astype(args[0].dtype)


register("linear", (2, 3), _infer_linear, _linear_ref,
         doc="y = x @ weight.T (+ bias); weight is [out_features, in_features] (an f16 weight of an f32 x "
             "is widened to f32)", tags={"linear"})


def _infer_matmul(types, attrs):
    a, b = types
    if a.rank < 2 or b.rank < 2 or a.shape[-1] != b.shape[-2]:
        raise OpError(f"matmul: {a} @ {b} do not fit")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2], "matmul")
    return TensorType(_same_dtype(types, "matmul"), batch + (a.shape[-2], b.shape[-1]))


register("matmul", 2, _infer_matmul, lambda args, attrs, env: np.matmul(args[0], args[1]),
         doc="batched matrix product with broadcast batch dims")


def _infer_embedding(types, attrs):
    ids, table = types
    if not ids.dtype.startswith("i") or table.rank != 2:
        raise OpError(f"embedding: ids {ids} must be integer and table {table} 2-D")
    return TensorType(table.dtype, ids.shape + (table.shape[1],))


register("embedding", 2, _infer_embedding, lambda args, attrs, env: args[1][args[0]],
         doc="table[ids]: rows of the table")

# ---- transformer blocks -----------------------------------------------------------------------


def _infer_rms_norm(types, attrs):
    x, w = types
    _float(x, "rms_norm")
    if w.shape != (x.shape[-1],):
        raise OpError(f"rms_norm: weight {w} should be [{x.shape[-1]}]")
    return x


def _rms_norm_ref(args, attrs, env):
    x, w = args
    x32 = x.astype(np.float32)
    var = np.mean(x32 * x32, axis=-1, keepdims=True)
    return (w * (x32 / np.sqrt(var + attrs["eps"]))).astype(x.dtype)


register("rms_norm", 2, _infer_rms_norm, _rms_norm_ref, attrs=("eps",),
         doc="weight * x / sqrt(mean(x^2, -1) + eps)")

ROPE_ATTRS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position")


def _infer_rope(types, attrs):
    x, pos = types
    if x.rank != 4 or pos.rank != 1 or pos.dtype != "i32" or pos.shape[0] != x.shape[1]:
        raise OpError(f"rope: expected x [batch, seq, heads, head_dim] and i32 pos [seq], got {x}, {pos}")
    return x


def _rope_ref(args, attrs, env):
    x, pos = args
    half = x.shape[-1] // 2
    freqs = pos.astype(np.float64)[:, None] * rope_attrs_inv_freq(x.shape[-1], attrs)[None, :]
    cos, sin = np.cos(freqs)[:, None, :], np.sin(freqs)[:, None, :]  # [seq, 1, half]
    x1, x2 = x[..., :half], x[..., half:]
    out = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


register("rope", 2, _infer_rope, _rope_ref, attrs=("theta",), optional_attrs=ROPE_ATTRS,
         doc="rotary embedding (rotate-half convention) at absolute positions pos")


def _infer_attention(types, attrs):
    q, k, v = types[:3]
    if len(types) == 4 and (types[3].dtype != "i32" or types[3].rank != 1 or types[3].shape[0] != q.shape[1]):
        raise OpError(f"attention: positions must be i32[{q.shape[1]}] (one per query), got {types[3]}")
    if q.rank != 4 or k.rank != 4 or k != v.with_dtype(k.dtype) or k.shape[3] != q.shape[3]:
        raise OpError(f"attention: expected q [b, s, heads, d], k/v [b, t, kv_heads, d]; got {q}, {k}, {v}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise OpError(f"attention: {heads} query heads are not a multiple of {kv_heads} kv heads")
    return q


def _attention_ref(args, attrs, env):
    q, k, v = (a.astype(np.float32) for a in args[:3])
    s, t = q.shape[1], k.shape[1]
    if len(args) == 4:  # queries at absolute positions: keys past the last one are never read
        positions = args[3].astype(np.int64)
        if positions.min() < 0 or positions.max() >= t:
            raise OpError(f"attention: positions {positions.min()}..{positions.max()} outside the {t} keys")
        t = int(positions.max()) + 1
        k, v = k[:, :t], v[:, :t]
    else:
        positions = np.arange(s) + (t - s)
    group = q.shape[2] // k.shape[2]
    k = np.repeat(k, group, axis=2)
    v = np.repeat(v, group, axis=2)
    scores = np.einsum("bshd,bthd->bhst", q, k) * attrs["scale"]
    if attrs.get("causal", True):
        future = np.arange(t)[None, :] > positions[:, None]
        scores = scores + np.where(future, np.float32(-1e30), np.float32(0))
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhst,bthd->bshd", probs, v).astype(args[0].dtype)


register("attention", (3, 4), _infer_attention, _attention_ref, attrs=("scale",), optional_attrs=("causal",),
         doc="grouped-query scaled dot-product attention; causal with the queries at the end of the keys, "
             "or, given i32 positions pos[s], query i at key position pos[i] (keys past max(pos) unread)")


def _infer_kv_write(types, attrs):
    cache, new, pos = types
    if cache.rank < 2 or new.rank != cache.rank or new.dtype != cache.dtype \
            or cache.shape[0] != new.shape[0] or cache.shape[2:] != new.shape[2:]:
        raise OpError(f"kv_write: expected cache [b, capacity, ...] and rows [b, s, ...] of one dtype, got {cache}, {new}")
    if pos.dtype != "i32" or pos.rank != 1 or pos.shape[0] != new.shape[1]:
        raise OpError(f"kv_write: positions must be i32[{new.shape[1]}] (one per row), got {pos}")
    return cache


def _kv_write_ref(args, attrs, env):
    cache, new, pos = args
    start, rows = int(pos[0]), new.shape[1]
    if start < 0 or start + rows > cache.shape[1]:
        raise OpError(f"kv_write: rows {start}..{start + rows - 1} do not fit a cache of {cache.shape[1]} rows")
    out = cache.copy()
    out[:, start:start + rows] = new
    return out


register("kv_write", 3, _infer_kv_write, _kv_write_ref,
         doc="the cache with rows pos[0] ... pos[0] + s - 1 (axis 1) replaced by the s new rows; "
             "compiled in place (the cache given is not read again)")

register("weight", 0, None, None, attrs=("name",), doc="an external weight, by name")


def _infer_take_last(types, attrs):
    t = types[0]
    axis = _norm_axis(attrs["axis"], t.rank, "take_last")
    return t.with_shape([1 if i == axis else d for i, d in enumerate(t.shape)])


def _take_last_ref(args, attrs, env):
    index = [slice(None)] * args[0].ndim
    index[attrs["axis"]] = slice(-1, None)
    return args[0][tuple(index)]


register("take_last", 1, _infer_take_last, _take_last_ref, attrs=("axis",),
         doc="the last element along axis, keeping the axis (e.g. the last token's hidden state)")


def _quant_scheme(attrs):
    """The scheme a ``dequantize`` names (ir/quant_schemes.py), or an OpError."""
    try:
        return get_scheme(attrs["scheme"])
    except LLMOptError as error:
        raise OpError(f"dequantize: {error.message}") from None


def _infer_dequantize(types, attrs):
    scheme = _quant_scheme(attrs)
    n, k = attrs["out_features"], attrs["in_features"]
    if not scheme.supports(k):
        raise OpError(f"dequantize: in_features={k} must be positive")
    expected = [TensorType("u32", (n, scheme.packed_width(k))), TensorType("f32", (n, scheme.groups(k)))]
    if not scheme.symmetric:
        expected.append(expected[1])
    if list(types) != expected:
        raise OpError(f"dequantize ({scheme.name}, [{n}, {k}]): expected operands "
                      f"{', '.join(map(str, expected))}; got {', '.join(map(str, types))}")
    dtype = attrs.get("dtype", "f32")
    if dtype not in ("f32", "f16"):
        raise OpError(f"dequantize: dtype={dtype!r} must be f32 or f16")
    return TensorType(dtype, (n, k))


def _dequantize_ref(args, attrs, env):
    zeros = args[2] if len(args) == 3 else None
    weight = _quant_scheme(attrs).dequantize_packed(args[0], args[1], zeros, attrs["in_features"])
    return weight.astype(DTYPES[attrs.get("dtype", "f32")])


register("dequantize", (2, 3), _infer_dequantize, _dequantize_ref, attrs=("scheme", "out_features", "in_features"),
         optional_attrs=("dtype",),
         doc="[out_features, in_features] (f32, or f16 with dtype=f16) from packed u32 codes, f32 scales "
             "[and zeros] of a quantization scheme")

def _nm_format(attrs):
    """The N:M storage a ``densify`` names (ir/sparse_format.py), or an OpError."""
    try:
        return NMFormat(attrs["n"], attrs["m"])
    except LLMOptError as error:
        raise OpError(f"densify: {error.message}") from None


def _infer_densify(types, attrs):
    fmt, n, k = _nm_format(attrs), attrs["out_features"], attrs["in_features"]
    if not fmt.fits(k):
        raise OpError(f"densify: in_features={k} is not a positive multiple of m={fmt.m}")
    expected = [TensorType("f32", (n, fmt.kept(k))), TensorType("u32", (n, fmt.index_words(k)))]
    if list(types) != expected:
        raise OpError(f"densify ({fmt.n}:{fmt.m}, [{n}, {k}]): expected operands "
                      f"{', '.join(map(str, expected))}; got {', '.join(map(str, types))}")
    return TensorType("f32", (n, k))


register("densify", 2, _infer_densify,
         lambda args, attrs, env: _nm_format(attrs).densify(args[0], args[1], attrs["in_features"]),
         attrs=("n", "m", "out_features", "in_features"),
         doc="f32 [out_features, in_features] from N:M-sparse storage: values f32 [out, in*n/m] and u32 "
             "indices (each value's position in its group of m, packed; ir/sparse_format.py); "
             "w[r, g*m + p] = sum of the values of group g at position p")


# the int8 ops (KV-cache rows, W8A8, W4A8) register themselves from their own module
from . import int8_ops  # noqa: E402,F401
