"""The int8 ops: KV-cache rows with one f32 scale each (and attention over such a cache), W8A8
(int8 activations x int8 weights) and W4A8 (int8 activations x symmetric 4-bit weights), with
their numpy references.

Registered into ``ops.OPS`` when ``ir.ops`` is imported (its last line imports this module).
"""

from __future__ import annotations

import numpy as np

from ..errors import LLMOptError
from .ops import OPS, OpError, register
from .quant_schemes import get_scheme
from .types import TensorType

# ---- int8 rows: one f32 scale per row of the last axis (e.g. per token and head of a KV cache) ---------

I8_MAX = 127  # symmetric int8: codes in [-127, 127]


def _infer_row_scale_i8(types, attrs):
    x = types[0]
    if x.dtype != "f32" or x.rank < 1:
        raise OpError(f"row_scale_i8: expected f32[..., D], got {x}")
    return x.with_shape(x.shape[:-1])


def _row_scale_i8_ref(args, attrs, env):
    absmax = np.max(np.abs(args[0]), axis=-1)
    return np.where(absmax == 0, np.float32(1), absmax / np.float32(I8_MAX)).astype(np.float32)


register("row_scale_i8", 1, _infer_row_scale_i8, _row_scale_i8_ref,
         doc="f32[...]: max |x| over the last axis / 127, the symmetric int8 scale of each row (1 for a zero row)")


def _infer_row_codes(op: str, codes_dtype: str, value_dtype: str):
    def infer(types, attrs):
        x, scale = types
        if x.dtype != codes_dtype or scale.dtype != "f32" or x.rank < 1 or scale.shape != x.shape[:-1]:
            raise OpError(f"{op}: expected {codes_dtype}[..., D] and f32[...] scales of its rows, got {x}, {scale}")
        return x.with_dtype(value_dtype)
    return infer


def _quantize_rows_i8_ref(args, attrs, env):
    x, scale = args
    return np.clip(np.rint(x / scale[..., None]), -I8_MAX, I8_MAX).astype(np.int8)


register("quantize_rows_i8", 2, _infer_row_codes("quantize_rows_i8", "f32", "i8"), _quantize_rows_i8_ref,
         doc="i8[..., D]: clip(round_half_even(x / scale), -127, 127) with one scale per row of the last axis")

register("dequantize_rows_i8", 2, _infer_row_codes("dequantize_rows_i8", "i8", "f32"),
         lambda args, attrs, env: args[0].astype(np.float32) * args[1][..., None],
         doc="f32[..., D]: codes * scale with one scale per row of the last axis")


def _infer_attention_i8_cache(types, attrs):
    q, k_codes, k_scales, k_new, v_codes, v_scales, v_new, pos = types
    for role, codes, scales, new in (("k", k_codes, k_scales, k_new), ("v", v_codes, v_scales, v_new)):
        if codes.dtype != "i8" or codes.rank != 4 or scales != TensorType("f32", codes.shape[:-1]) \
                or new.dtype != "f32" or new.rank != 4 or new.shape[2:] != codes.shape[2:] \
                or new.shape[1] != q.shape[1]:
            raise OpError(f"attention_i8_cache: expected {role} codes i8[b, capacity, kv_heads, d], their f32 row "
                          f"scales [b, capacity, kv_heads] and the step's f32 rows [b, s, kv_heads, d]; "
                          f"got {codes}, {scales}, {new}")
    return OPS["attention"].infer([q, k_new.with_shape(k_codes.shape), v_new.with_shape(v_codes.shape), pos], attrs)


def _attention_i8_cache_ref(args, attrs, env):
    q, k_codes, k_scales, k_new, v_codes, v_scales, v_new, pos = args
    write, dequantize = OPS["kv_write"].ref, OPS["dequantize_rows_i8"].ref
    keys = write([dequantize([k_codes, k_scales], {}, env), k_new, pos], {}, env)
    values = write([dequantize([v_codes, v_scales], {}, env), v_new, pos], {}, env)
    return OPS["attention"].ref([q, keys, values, pos], attrs, env)


register("attention_i8_cache", 8, _infer_attention_i8_cache, _attention_i8_cache_ref, attrs=("scale",),
         optional_attrs=("causal",),
         doc="attention(q, K, V, pos) over an int8 cache: K = kv_write(dequantize_rows_i8(k_codes, "
             "k_scales), k_new, pos) (the past rows dequantized, the step's own rows in f32), V likewise; "
             "one kernel reads the codes, no dequantized cache is made")


# ---- int8 activations x int8 weights (W8A8) ---------------------------------------------------

W8A8_WEIGHT_SCHEME = "w8"  # the weight codes of linear_w8a8: symmetric int8 per output channel


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (per-token) symmetric int8 quantization of f32 ``x[..., K]``: codes int8 ``[..., K]``
    and scales f32 ``[..., 1]``, ``scale = max|row| / 127`` (1 for an all-zero row),
    ``code = clip(round_half_even(x / scale), -127, 127)``."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return np.clip(np.round(x / scale), -127, 127).astype(np.int8), scale


def _static_f32_features(op: str, x: TensorType) -> int:
    """K of an int8-activation linear's f32 input ``x[..., K]``; an OpError unless it is static."""
    k = x.shape[-1]
    if x.dtype != "f32" or not isinstance(k, int):
        raise OpError(f"{op}: x must be f32 with a static last dim, got {x}")
    return k


def _infer_packed_linear(op: str, types, codes_width: int, scales_width: int, what: str) -> TensorType:
    """The output type of an int8-activation linear ``op(x, codes u32[N, codes_width], scales
    f32[N, scales_width][, bias f32[N]])``; ``what`` names the weights in the error."""
    x, packed = types[:2]
    n = packed.shape[0] if packed.rank == 2 else None
    expected = [TensorType("u32", (n, codes_width)), TensorType("f32", (n, scales_width))]
    expected += [TensorType("f32", (n,))] * (len(types) - 3)
    if n is None or list(types[1:]) != expected:
        raise OpError(f"{op} ({what}): expected codes, scales[, bias] {', '.join(map(str, expected))}; "
                      f"got {', '.join(map(str, types[1:]))}")
    return x.with_shape(x.shape[:-1] + (n,))


def _infer_linear_w8a8(types, attrs):
    k = _static_f32_features("linear_w8a8", types[0])
    return _infer_packed_linear("linear_w8a8", types, -(-k // 4), 1, f"K={k}")


def _linear_w8a8_ref(args, attrs, env):
    x, packed, scales = args[:3]
    xq, x_scale = quantize_rows_int8(x)
    wq = get_scheme(W8A8_WEIGHT_SCHEME).unpack(packed, x.shape[-1]).astype(np.int32) - 128
    acc = np.matmul(xq.astype(np.float64), wq.T.astype(np.float64)).astype(np.int32)  # exact: |acc| < 2^53
    y = acc.astype(np.float32) * (x_scale * scales[:, 0])
    return (y + args[3] if len(args) == 4 else y).astype(np.float32)


register("linear_w8a8", (3, 4), _infer_linear_w8a8, _linear_w8a8_ref,
         doc="y = (xq @ wq.T) * (x_scale * w_scale) (+ bias): x quantized per row to int8 "
             "(quantize_rows_int8), weight codes of the w8 scheme (u32-packed [N, ceil(K/4)], scales "
             "[N, 1]); int32 accumulation")


# ---- int8 activations x 4-bit weights (W4A8) --------------------------------------------------

W4A8_OFFSET = 8  # a symmetric 4-bit code is its level + 8
W4A8_GROUPS = (32, 64, 128)  # the weight (and activation) groups linear_w4a8 takes ...
W4A8_CHUNK = 32  # ... over in_features a multiple of this (a short last group allowed)


def w4a8_scheme(scheme_name: str, in_features: int):
    """The weight scheme a ``linear_w4a8`` names, if its codes can meet int8 activations: symmetric
    integer 4-bit codes in groups of 32, 64 or 128 (``w4g32``, ``w4g64``, ``w4g128``) on a multiple of
    32 input features; else an OpError."""
    try:
        scheme = get_scheme(scheme_name)
    except LLMOptError as error:
        raise OpError(f"linear_w4a8: {error.message}") from None
    if scheme.bits != 4 or not scheme.symmetric or scheme.codebook is not None or not scheme.supports(in_features):
        raise OpError(f"linear_w4a8: scheme {scheme.name} is not symmetric integer 4-bit codes "
                      f"(or does not take in_features={in_features})")
    if scheme.group_of(in_features) not in W4A8_GROUPS or in_features % W4A8_CHUNK:
        raise OpError(f"linear_w4a8: {scheme.name} on in_features={in_features} has groups of "
                      f"{scheme.group_of(in_features)}; W4A8 takes groups of {', '.join(map(str, W4A8_GROUPS))} "
                      f"and in_features a multiple of {W4A8_CHUNK}")
    return scheme


def quantize_groups_int8(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """f32 ``x[M, K]`` quantized to int8 per (row, group of ``group`` features; the last may be short),
    each group as ``quantize_rows_int8`` does a row: codes int8 ``[M, K]``, scales f32 ``[M, groups]``."""
    parts = [quantize_rows_int8(np.asarray(x[:, start:start + group], np.float32))
             for start in range(0, x.shape[1], group)]
    return np.concatenate([xq for xq, _ in parts], axis=1), np.concatenate([sx for _, sx in parts], axis=1)


def linear_w4a8_reference(x: np.ndarray, packed: np.ndarray, scales: np.ndarray, scheme_name: str) -> np.ndarray:
    """``linear_w4a8`` on x f32 ``[M, K]``: x quantized per (row, weight group) to int8
    (``quantize_groups_int8``); per group ``g`` the exact integer sum ``isum = xq[:, g] @ (codes - 8)[:, g].T``;
    ``y = 0``, then for ascending ``g``: ``y = fma(f32(isum), f32(sx[:, g] * sw[:, g]), y)``, one rounding
    per step (emulated in float64, where the product is exact)."""
    m, k = x.shape
    scheme = w4a8_scheme(scheme_name, k)
    group = scheme.group_of(k)
    xq, sx = quantize_groups_int8(x, group)
    levels = get_scheme("w4").unpack(packed, k).astype(np.float64) - W4A8_OFFSET  # unpacking is group-free
    y = np.zeros((m, len(packed)), np.float32)
    for g in range(scheme.groups(k)):
        cols = slice(g * group, min(k, (g + 1) * group))
        isum = xq[:, cols].astype(np.float64) @ levels[:, cols].T  # exact integers (|isum| < 2^53)
        scale = sx[:, g, None] * scales[None, :, g]  # the f32 product
        y = (isum * scale.astype(np.float64) + y).astype(np.float32)
    return y


def _infer_linear_w4a8(types, attrs):
    k = _static_f32_features("linear_w4a8", types[0])
    scheme = w4a8_scheme(attrs["scheme"], k)
    return _infer_packed_linear("linear_w4a8", types, scheme.packed_width(k), scheme.groups(k),
                                f"{scheme.name}, K={k}")


def _linear_w4a8_ref(args, attrs, env):
    x = args[0]
    y = linear_w4a8_reference(x.reshape(-1, x.shape[-1]), args[1], args[2], attrs["scheme"])
    y = y.reshape(x.shape[:-1] + (y.shape[-1],))
    return (y + args[3] if len(args) == 4 else y).astype(np.float32)


register("linear_w4a8", (3, 4), _infer_linear_w4a8, _linear_w4a8_ref, attrs=("scheme",),
         doc="y = sum over the weight's groups of (xq . wq) * (x_scale * w_scale) (+ bias): x quantized to "
             "int8 per (row, group) (quantize_groups_int8), symmetric 4-bit weight codes (u32-packed "
             "[N, K/8], scales [N, groups]); int32 sums per group, f32 fma over the groups in order")
