"""The aten -> IR table of the torch.export frontend: ``ATEN_TO_IR[op](ctx, args) -> IR value``.

A translator gets the ``TraceContext`` (torch_export.py) and the op's arguments by schema name
(``self``, ``other``, ``dim``.., defaults filled in), emits IR with ``ctx.add`` and returns the
value standing for the op's result (None for ops without one). The frontend checks that value's
type against torch's fake tensor, so a translator may take shapes from ``ctx.out_type``.

Ops the IR has no direct counterpart for:

- ``expand`` to a larger size is materialized: a ``concat`` of copies along each expanded axis
  (static sizes only); an expand that changes nothing is dropped;
- ``layer_norm`` is written out with mean, sub, mul and rsqrt;
- ``scaled_dot_product_attention`` becomes ``attention`` (which takes [b, s, heads, d], so
  transposes go around it) when it has no mask and ``is_causal`` (or not), or a mask folded at
  trace time that is all-true or exactly the causal pattern.
"""

from __future__ import annotations

import math

import torch

aten = torch.ops.aten
BIG = 2 ** 62  # slice ends at or past this mean "to the end" (torch writes sys.maxsize)


def _identity(ctx, a):
    return ctx.value(a["self"])


def _no_result(ctx, a):
    return None


def _cast(ctx, a):
    return ctx.operand(a["self"], ctx.out_type.dtype)


def _unary(op: str):
    def translate(ctx, a):
        return ctx.add(op, ctx.operand(a["self"], ctx.out_type.dtype))
    return translate


def _binary(op: str):
    def translate(ctx, a):
        dtype = ctx.out_type.dtype
        other = ctx.operand(a["other"], dtype)
        if a.get("alpha", 1) != 1:
            other = ctx.add("mul", other, ctx.scalar(a["alpha"], dtype))
        return ctx.add(op, ctx.operand(a["self"], dtype), other)
    return translate


def _gelu(ctx, a):
    return ctx.add("gelu", ctx.operand(a["self"], "f32"), approximate=a["approximate"])


def _pow(ctx, a):
    return ctx.add("pow", ctx.operand(a["self"], "f32"), exponent=a["exponent"])


def _reduce(op: str):
    def translate(ctx, a):
        x = ctx.operand(a["self"], ctx.out_type.dtype)
        rank = ctx.b.types[x].rank
        axes = tuple(sorted({d % rank for d in a.get("dim") or range(rank)}))
        return ctx.add(op, x, axes=axes, keepdims=bool(a.get("keepdim", False)))
    return translate


def _softmax(ctx, a):
    x = ctx.operand(a["self"], "f32")
    return ctx.add("softmax", x, axis=a["dim"] % ctx.b.types[x].rank)


# ---- linear algebra ---------------------------------------------------------------------------

def _linear(ctx, a):
    return ctx.add("linear", *(ctx.operand(a[k], "f32") for k in ("input", "weight", "bias") if a[k] is not None))


def _matmul_of(ctx, x: str, y: str) -> str:
    """torch.matmul: 1-D operands get a unit axis, the result is reshaped to torch's shape."""
    if ctx.b.types[x].rank == 1:
        x = ctx.add("reshape", x, shape=(1,) + ctx.b.types[x].shape)
    if ctx.b.types[y].rank == 1:
        y = ctx.add("reshape", y, shape=ctx.b.types[y].shape + (1,))
    out = ctx.add("matmul", x, y)
    return out if ctx.b.types[out].shape == ctx.out_type.shape else ctx.add("reshape", out, shape=ctx.out_type.shape)


def _matmul(other: str):
    def translate(ctx, a):
        return _matmul_of(ctx, ctx.operand(a["self"], "f32"), ctx.operand(a[other], "f32"))
    return translate


def _scaled(ctx, x: str, factor) -> str:
    return x if factor == 1 else ctx.add("mul", x, ctx.scalar(factor, "f32"))


def _addmm(ctx, a):
    product = _matmul_of(ctx, ctx.operand(a["mat1"], "f32"), ctx.operand(a["mat2"], "f32"))
    return ctx.add("add", _scaled(ctx, product, a["alpha"]), _scaled(ctx, ctx.operand(a["self"], "f32"), a["beta"]))


# ---- layout -----------------------------------------------------------------------------------

def _reshape(ctx, a):
    x, shape = ctx.value(a["self"]), ctx.out_type.shape
    return x if ctx.b.types[x].shape == shape else ctx.add("reshape", x, shape=shape)


def _transpose_by(ctx, x: str, perm) -> str:
    perm = tuple(p % len(perm) for p in perm)
    return x if perm == tuple(range(len(perm))) else ctx.add("transpose", x, perm=perm)


def _permute(ctx, a):
    return _transpose_by(ctx, ctx.value(a["self"]), a["dims"])


def _swap_axes(ctx, a):
    x = ctx.value(a["self"])
    perm = list(range(ctx.b.types[x].rank))
    if perm:
        first, second = a.get("dim0", 0) % len(perm), a.get("dim1", 1) % len(perm)
        perm[first], perm[second] = perm[second], perm[first]
    return _transpose_by(ctx, x, perm)


def _expand(ctx, a):
    x, target = ctx.value(a["self"]), ctx.out_type.shape
    shape = ctx.b.types[x].shape
    if len(shape) < len(target):
        shape = (1,) * (len(target) - len(shape)) + shape
        x = ctx.add("reshape", x, shape=shape)
    for axis, (have, want) in enumerate(zip(shape, target)):
        if have != want:
            if not isinstance(want, int):
                ctx.fail(f"expands axis {axis} to the symbolic size {want}",
                         "Let broadcasting do it (drop the expand), or keep that size static.")
            x = ctx.add("concat", *[x] * want, axis=axis)
    return x


def _cat(ctx, a):
    dtype, rank = ctx.out_type.dtype, ctx.out_type.rank
    return ctx.add("concat", *(ctx.operand(t, dtype) for t in a["tensors"]), axis=a["dim"] % rank)


def _bounds(ctx, size, start, end) -> tuple[int, int] | None:
    """Static [start, end) of a slice of an axis of ``size``; None when it keeps the whole axis."""
    if any(isinstance(b, torch.fx.Node) for b in (start, end)):
        ctx.fail("slices at a position computed at run time", "Slice with Python ints.")
    if isinstance(size, int):
        start, end, _ = slice(start, end).indices(size)
        return None if (start, max(start, end)) == (0, size) else (start, max(start, end))
    start = start or 0
    if start == 0 and (end is None or end >= BIG):
        return None
    if 0 <= start and end is not None and start <= end < BIG:  # assumes size >= end (torch would clamp)
        return start, end
    ctx.fail(f"slices [{start}:{end}] of the symbolic size {size}",
             "Keep that size static, or slice a static range from its start.")


def _slice(ctx, a):
    x = ctx.value(a["self"])
    if a["step"] != 1:
        ctx.fail(f"slices with step {a['step']}", "Use step 1 (llmopt slices are contiguous).")
    axis = a["dim"] % ctx.b.types[x].rank
    bounds = _bounds(ctx, ctx.b.types[x].shape[axis], a["start"], a["end"])
    return x if bounds is None else ctx.add("slice", x, axis=axis, start=bounds[0], end=bounds[1])


def _select(ctx, a):
    x = ctx.value(a["self"])
    axis = a["dim"] % ctx.b.types[x].rank
    index = a["index"]
    end = index + 1 if index != -1 else None
    bounds = _bounds(ctx, ctx.b.types[x].shape[axis], index, end) or (0, 1)
    return ctx.add("reshape", ctx.add("slice", x, axis=axis, start=bounds[0], end=bounds[1]), shape=ctx.out_type.shape)


def _embedding(ctx, a):
    return ctx.add("embedding", ctx.operand(a["indices"], "i32"), ctx.value(a["weight"]))


# ---- blocks -----------------------------------------------------------------------------------

def _layer_norm(ctx, a):
    x = ctx.operand(a["input"], "f32")
    rank = ctx.b.types[x].rank
    axes = tuple(range(rank - len(a["normalized_shape"]), rank))
    centered = ctx.add("sub", x, ctx.add("mean", x, axes=axes, keepdims=True))
    variance = ctx.add("mean", ctx.add("mul", centered, centered), axes=axes, keepdims=True)
    y = ctx.add("mul", centered, ctx.add("rsqrt", ctx.add("add", variance, ctx.scalar(a["eps"], "f32"))))
    if a["weight"] is not None:
        y = ctx.add("mul", y, ctx.operand(a["weight"], "f32"))
    return y if a["bias"] is None else ctx.add("add", y, ctx.operand(a["bias"], "f32"))


def _causal(ctx, a, queries, keys) -> bool:
    """The ``causal`` flag of ``attention`` equivalent to sdpa's mask and ``is_causal``."""
    mask = a["attn_mask"]
    if mask is None:
        if a["is_causal"] and queries != keys:
            ctx.fail(f"is causal with {queries} queries and {keys} keys: torch aligns the mask top-left, "
                     "llmopt's attention bottom-right (queries last)", "Use as many queries as keys.")
        return bool(a["is_causal"])
    tensor = ctx.concrete(mask)
    if tensor is None:
        ctx.fail("takes an attention mask computed from the inputs",
                 "Pass is_causal=True or no mask; llmopt's attention is causal or full.")
    allowed = tensor if tensor.dtype == torch.bool else tensor == 0
    if tensor.dtype != torch.bool and not bool((tensor[~allowed] <= -1e4).all()):
        ctx.fail("takes a float attention mask that is not 0 / -inf", "Use a boolean or 0/-inf mask.")
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    allowed, causal = torch.broadcast_tensors(allowed, causal)
    if bool(allowed.all()):
        return False
    if torch.equal(allowed, causal):
        return True
    ctx.fail("takes an attention mask that is neither causal nor all-true (padding?)",
             "Trace without padding; llmopt's attention is causal or full.")


def _sdpa(ctx, a):
    q, k, v = (ctx.operand(a[name], "f32") for name in ("query", "key", "value"))
    q_type, k_type = ctx.b.types[q], ctx.b.types[k]
    if q_type.rank != 4 or a["dropout_p"]:
        ctx.fail("is not a 4-D attention without dropout", "Use [batch, heads, seq, head_dim] tensors, dropout 0.")
    causal = _causal(ctx, a, q_type.shape[2], k_type.shape[2])
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q_type.shape[3])
    heads_second = [_transpose_by(ctx, t, (0, 2, 1, 3)) for t in (q, k, v)]
    out = ctx.add("attention", *heads_second, scale=float(scale), causal=causal)
    return _transpose_by(ctx, out, (0, 2, 1, 3))


# ---- the table --------------------------------------------------------------------------------

_UNARY = {aten.neg.default: "neg", aten.exp.default: "exp", aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt",
          aten.tanh.default: "tanh", aten.sin.default: "sin", aten.cos.default: "cos",
          aten.sigmoid.default: "sigmoid", aten.silu.default: "silu", aten.relu.default: "relu"}
_BINARY = {aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub",
           aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div", aten.div.Scalar: "div",
           aten.maximum.default: "maximum", aten.minimum.default: "minimum"}
_REDUCE = {aten.mean.dim: "mean", aten.mean.default: "mean", aten.sum.dim_IntList: "sum",
           aten.sum.default: "sum", aten.amax.default: "max"}
_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
             aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints)
_IDENTITIES = (aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
               aten.lift_fresh_copy.default)
_CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)

ATEN_TO_IR = {
    **{op: _unary(name) for op, name in _UNARY.items()},
    **{op: _binary(name) for op, name in _BINARY.items()},
    **{op: _reduce(name) for op, name in _REDUCE.items()},
    **dict.fromkeys(_RESHAPES, _reshape),
    **dict.fromkeys(_IDENTITIES, _identity),
    **dict.fromkeys(_CASTS, _cast),
    aten.gelu.default: _gelu,
    aten.pow.Tensor_Scalar: _pow,
    aten.softmax.int: _softmax,
    aten._softmax.default: _softmax,
    aten.linear.default: _linear,
    aten.mm.default: _matmul("mat2"),
    aten.bmm.default: _matmul("mat2"),
    aten.matmul.default: _matmul("other"),
    aten.addmm.default: _addmm,
    aten.permute.default: _permute,
    aten.transpose.int: _swap_axes,
    aten.t.default: _swap_axes,
    aten.expand.default: _expand,
    aten.cat.default: _cat,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.embedding.default: _embedding,
    aten.layer_norm.default: _layer_norm,
    aten.scaled_dot_product_attention.default: _sdpa,
    aten._assert_tensor_metadata.default: _no_result,
}


def supported_op_names() -> list[str]:
    """The aten ops ATEN_TO_IR translates, as ``name.overload``."""
    return sorted(f"{op._schema.name.split('::')[-1]}.{op._overloadname}" for op, translate in ATEN_TO_IR.items()
                  if translate is not _no_result)
