"""The CPU attention kernels (codegen/kernels/cpu_attention.py) against numpy softmax attention."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import te

from llmopt.codegen.kernels.cpu_attention import DECODE_KEY_TILE, fast_exp, make_decode_attention
from llmopt.ir.ops import OPS
from llmopt.targets.cpu import cpu_target


def reference(q, k, v, scale, live):
    """q [1, 1, H, D]; k, v [1, T, KV, D]: softmax(q k^T * scale) v over the first ``live`` keys."""
    heads, kv_heads = q.shape[2], k.shape[2]
    k = np.repeat(k[0, :live].astype(np.float64), heads // kv_heads, axis=1)  # [t, H, D]
    v = np.repeat(v[0, :live].astype(np.float64), heads // kv_heads, axis=1)
    scores = np.einsum("hd,thd->ht", q[0, 0].astype(np.float64), k) * scale
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return np.einsum("ht,thd->hd", probs, v)[None, None].astype(np.float32)


def compiled(heads, kv_heads, dim, scale, positions):
    func = make_decode_attention(heads, kv_heads, dim, scale, positions=positions)
    target = tvm.target.Target(cpu_target(None))
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 16), (6, 2, 8), (2, 2, 12)])
@pytest.mark.parametrize("live", [1, DECODE_KEY_TILE - 1, DECODE_KEY_TILE, 2 * DECODE_KEY_TILE + 5, 137])
def test_decode_attention_at_reads_only_live_keys(heads, kv_heads, dim, live):
    """``pos`` selects the live keys of a larger buffer; rows after them hold garbage (huge values)
    that must not leak into the result."""
    rng = np.random.default_rng(live * 100 + dim)
    capacity = live + 40
    q = rng.standard_normal((1, 1, heads, dim)).astype(np.float32)
    k = rng.standard_normal((1, capacity, kv_heads, dim)).astype(np.float32) * 2
    v = rng.standard_normal((1, capacity, kv_heads, dim)).astype(np.float32)
    k[:, live:], v[:, live:] = 1e30, np.nan
    scale = dim ** -0.5
    fn = compiled(heads, kv_heads, dim, scale, positions=True)
    out = tvm.runtime.tensor(np.zeros_like(q))
    fn(*(tvm.runtime.tensor(a) for a in (q, k, v, np.array([live - 1], np.int32))), out)
    np.testing.assert_allclose(out.numpy(), reference(q, k, v, scale, live), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("live", [1, 3 * DECODE_KEY_TILE, 70])
def test_decode_attention_over_all_keys(live):
    rng = np.random.default_rng(live)
    heads, kv_heads, dim = 4, 2, 16
    q = rng.standard_normal((1, 1, heads, dim)).astype(np.float32) * 3  # peaked softmax
    k = rng.standard_normal((1, live, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((1, live, kv_heads, dim)).astype(np.float32)
    fn = compiled(heads, kv_heads, dim, 0.25, positions=False)
    out = tvm.runtime.tensor(np.zeros_like(q))
    fn(*(tvm.runtime.tensor(a) for a in (q, k, v)), out)
    np.testing.assert_allclose(out.numpy(), reference(q, k, v, 0.25, live), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 16)])
@pytest.mark.parametrize("live", [1, DECODE_KEY_TILE, DECODE_KEY_TILE + 1, 137])
def test_decode_attention_over_an_int8_cache_matches_the_op(heads, kv_heads, dim, live):
    """``attention_i8_cache``'s kernel: the past rows from their codes and scales, the step's own row
    (at ``pos`` = live - 1) in f32, the rows after it never read."""
    rng = np.random.default_rng(live + dim)
    capacity = live + 40
    q = rng.standard_normal((1, 1, heads, dim)).astype(np.float32)
    codes = [rng.integers(-127, 128, (1, capacity, kv_heads, dim)).astype(np.int8) for _ in range(2)]
    scales = [rng.uniform(0.005, 0.03, (1, capacity, kv_heads)).astype(np.float32) for _ in range(2)]
    for c, s in zip(codes, scales):
        c[:, live:], s[:, live:] = 127, np.float32(1e30)  # garbage past the live rows
    new = [rng.standard_normal((1, 1, kv_heads, dim)).astype(np.float32) for _ in range(2)]
    pos = np.array([live - 1], np.int32)
    args = [q, codes[0], scales[0], new[0], codes[1], scales[1], new[1], pos]
    want = OPS["attention_i8_cache"].ref(args, {"scale": dim ** -0.5}, {})
    func = make_decode_attention(heads, kv_heads, dim, dim ** -0.5, positions=True, int8_cache=True)
    fn = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target(cpu_target(None)))["main"]
    out = tvm.runtime.tensor(np.zeros_like(q))
    fn(*(tvm.runtime.tensor(a) for a in args), out)
    np.testing.assert_allclose(out.numpy(), want, rtol=2e-5, atol=2e-6)


def test_fast_exp_is_within_one_ulp_and_zero_below_its_range():
    xs = np.concatenate([np.linspace(-87, 88, 200_003, dtype=np.float32),
                         np.array([-3e38, -1e30, -88, -87.5, 0, 1e-30], np.float32)])
    x = te.placeholder(xs.shape, "float32")
    func = te.create_prim_func([x, te.compute(x.shape, lambda i: fast_exp(x[i]))])
    fn = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                     target=tvm.target.Target(cpu_target(None)))["main"]
    out = tvm.runtime.tensor(np.zeros_like(xs))
    fn(tvm.runtime.tensor(xs), out)
    got, exact = out.numpy(), np.exp(xs.astype(np.float64))
    live = xs >= -87
    ulps = np.abs(got[live] - exact[live]) / np.spacing(exact[live].astype(np.float32))
    assert ulps.max() <= 1.0
    np.testing.assert_array_equal(got[xs < -87], 0)
