"""Quantization schemes: bit-exact packing, round-to-nearest against a per-group re-derivation, errors."""

import numpy as np
import pytest

from llmopt.errors import LLMOptError
from llmopt.ir.quant_schemes import SCHEMES, QuantizedWeight, Scheme, get_scheme


def rederive(scheme: Scheme, w: np.ndarray):
    """Codes, scales and zeros computed group by group with plain Python scalars."""
    n, k = w.shape
    group = scheme.group_size or k
    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, k // group))
    zeros = np.zeros((n, k // group))
    for row in range(n):
        for g in range(k // group):
            values = [float(v) for v in w[row, g * group:(g + 1) * group]]
            if scheme.symmetric:
                qmax = 2 ** (scheme.bits - 1) - 1
                scale = max(abs(v) for v in values) / qmax or 1.0
                zero = 2 ** (scheme.bits - 1)
            else:
                scale = (max(values) - min(values)) / (2 ** scheme.bits - 1) or abs(min(values)) or 1.0
                zero = round(-min(values) / scale)
            scales[row, g], zeros[row, g] = scale, zero
            for i, v in enumerate(values):
                codes[row, g * group + i] = min(max(round(v / scale) + zero, 0), 2 ** scheme.bits - 1)
    return codes, scales, zeros


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_pack_unpack_is_bit_exact(name):
    scheme = SCHEMES[name]
    rng = np.random.default_rng(1)
    for k in (1, 10, 70, 256):  # partial last words too
        codes = rng.integers(0, 2 ** scheme.bits, (5, k)).astype(np.uint8)
        packed = scheme.pack(codes)
        assert packed.dtype == np.uint32 and packed.shape == (5, -(-k // (32 // scheme.bits)))
        np.testing.assert_array_equal(scheme.unpack(packed, k), codes)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_packing_layout_code_k_at_bit_k_times_bits(name):
    scheme = SCHEMES[name]
    per_word = 32 // scheme.bits
    codes = (np.arange(2 * per_word) % 2 ** scheme.bits).astype(np.uint8)[None, :]
    words = [sum(int(c) << (j * scheme.bits) for j, c in enumerate(codes[0, w * per_word:(w + 1) * per_word]))
             for w in range(2)]
    np.testing.assert_array_equal(scheme.pack(codes), np.array([words], np.uint32))


def test_three_bit_codes_go_ten_to_a_word():
    assert SCHEMES["w3g128"].packed_width(128) == 13
    assert SCHEMES["w4g128"].packed_width(128) == 16 and SCHEMES["w8"].packed_width(128) == 32


INTEGER_SCHEMES = sorted(name for name, scheme in SCHEMES.items() if scheme.codebook is None)
CODEBOOK_SCHEMES = sorted(name for name, scheme in SCHEMES.items() if scheme.codebook is not None)


@pytest.mark.parametrize("name", INTEGER_SCHEMES)
def test_quantize_matches_rederivation_and_error_is_within_half_a_step(name):
    scheme = SCHEMES[name]
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 256)).astype(np.float32)
    w[0, :128] = 0  # an all-zero group
    w[1] += 3  # an asymmetric row
    q = scheme.quantize(w)
    codes, scales, zeros = rederive(scheme, w)
    group = scheme.group_size or 256
    assert q.codes.dtype == np.uint8 and q.scales.shape == (6, 256 // group)
    np.testing.assert_allclose(q.scales, scales, rtol=1e-6)
    assert np.mean(q.codes == codes) > 0.999  # f32 vs f64 may round a value at exactly .5 differently
    if scheme.symmetric:
        assert q.zeros is None
    else:
        np.testing.assert_array_equal(q.zeros, zeros)
    error = np.abs(scheme.dequantize(q) - w).reshape(6, -1, group).max(axis=-1)
    assert np.all(error <= q.scales / 2 * (1 + 1e-5))
    assert np.all(error[0, :128 // group] == 0)


def test_asymmetric_weights_on_the_grid_are_reproduced_exactly():
    scheme = SCHEMES["w4g32-asym"]
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 16, (4, 64))
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole code range
    scales = 2.0 ** rng.integers(-8, 0, (4, 2))  # powers of two: the grid is exact in f32
    zeros = rng.integers(0, 16, (4, 2))
    w = ((codes.reshape(4, 2, 32) - zeros[..., None]) * scales[..., None]).reshape(4, 64).astype(np.float32)
    q = scheme.quantize(w)
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.zeros, zeros)
    np.testing.assert_array_equal(scheme.dequantize(q), w)
    np.testing.assert_array_equal(scheme.dequantize_packed(scheme.pack(q.codes), q.scales, q.zeros, 64), w)


def per_group_reference(scheme: Scheme, w: np.ndarray):
    """Codes, scales, zeros (None when symmetric) and the dequantized weight, computed in f32 on each
    group's own columns ``w[:, start:start + group]``, the last one short when the group does not
    divide K: the module docstring's formulas, without ``grid``/``encode``/``decode``."""
    n, k = w.shape
    group = scheme.group_size or k
    codes, scales, zeros, values = [], [], [], []
    for start in range(0, k, group):
        part = w[:, start:start + group].astype(np.float32)
        if scheme.codebook is not None:
            levels = np.asarray(scheme.codebook, np.float32)
            scale = np.abs(part).max(axis=1) / np.abs(levels).max()
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            code = np.abs((part / scale[:, None])[..., None] - levels).argmin(axis=-1)  # ties: the lower level
            level, zero = levels[code], None
        elif scheme.symmetric:
            qmax = np.float32(2 ** (scheme.bits - 1) - 1)
            scale = np.abs(part).max(axis=1) / qmax
            scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
            q = np.clip(np.round(part / scale[:, None]), -qmax, qmax)
            code, level, zero = q + 2 ** (scheme.bits - 1), q, None
        else:
            low, high = part.min(axis=1), part.max(axis=1)
            scale = (high - low) / np.float32(2 ** scheme.bits - 1)
            scale = np.where(scale > 0, scale, np.where(low != 0, np.abs(low), np.float32(1))).astype(np.float32)
            zero = np.round(-low / scale).astype(np.float32)
            code = np.clip(np.round(part / scale[:, None]) + zero[:, None], 0, 2 ** scheme.bits - 1)
            level = code - zero[:, None]
        codes.append(code.astype(np.uint8))
        scales.append(scale)
        zeros.append(zero)
        values.append((level * scale[:, None]).astype(np.float32))
    stacked_zeros = None if zeros[0] is None else np.stack(zeros, axis=1)
    return np.concatenate(codes, axis=1), np.stack(scales, axis=1), stacked_zeros, np.concatenate(values, axis=1)


@pytest.mark.parametrize("name, k", [("w4g128", 576), ("w4g128-asym", 576), ("nf4g128", 576), ("w3g128", 576),
                                     ("w4g64", 200), ("w4g64-asym", 200), ("nf4g64", 200), ("w4g128", 64)])
def test_ragged_groups_match_a_per_group_computation(name, k):
    """K not a multiple of the group: ceil(K / group) groups, the last one short, its grid from its
    own values only (here the tail holds the row's extremes and the full groups small values, and
    vice versa, so a tail grid borrowing any other value would show)."""
    scheme = get_scheme(name)
    group = scheme.group_size
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, k)).astype(np.float32)
    tail = slice(k // group * group, k)
    w[0, tail] *= 20  # a tail of outliers
    w[1, tail] *= 0.01  # a tail of tiny values
    w[2, tail] = 0  # an all-zero tail
    w[3] += 3  # an asymmetric row
    w[4, tail] = -1.5  # a constant tail
    q = scheme.quantize(w)
    codes, scales, zeros, dequantized = per_group_reference(scheme, w)
    assert scheme.groups(k) == -(-k // group) and q.scales.shape == (6, -(-k // group))
    np.testing.assert_array_equal(q.codes, codes)
    np.testing.assert_array_equal(q.scales, scales)
    if zeros is None:
        assert q.zeros is None
    else:
        np.testing.assert_array_equal(q.zeros, zeros)
    np.testing.assert_array_equal(scheme.dequantize(q), dequantized)
    packed = scheme.pack(q.codes)
    assert packed.shape == (6, scheme.packed_width(k))
    np.testing.assert_array_equal(scheme.dequantize_packed(packed, q.scales, q.zeros, k), dequantized)
    if scheme.codebook is None:  # within half a step of the weight, the all-zero and constant tails exactly
        assert np.all(np.abs(dequantized - w) <= np.repeat(q.scales, group, axis=1)[:, :k] / 2 * (1 + 1e-5))
        np.testing.assert_array_equal(dequantized[[2, 4], tail], w[[2, 4], tail])


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(LLMOptError) as error:
        get_scheme("int5")
    assert "int5" in error.value.message and all(name in error.value.hint for name in SCHEMES)


def test_invalid_scheme_and_group_mismatch_are_user_errors():
    with pytest.raises(LLMOptError, match="bits=9"):
        Scheme("w9", bits=9, group_size=0, symmetric=True)
    with pytest.raises(LLMOptError, match="storage_dtype"):
        Scheme("w4", bits=4, group_size=0, symmetric=True, storage_dtype="u8")
    with pytest.raises(LLMOptError, match="0 input features"):
        SCHEMES["w4g128"].groups(0)
    assert not SCHEMES["w4g128"].supports(0) and SCHEMES["w4g128"].supports(64)  # 64 < 128: one short group
    assert isinstance(SCHEMES["w8"].quantize(np.ones((2, 3), np.float32)), QuantizedWeight)


def test_fp8_levels_are_torchs_float8_e4m3fn():
    import torch
    every_byte = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    levels = np.array(SCHEMES["fp8"].codebook, np.float32)
    np.testing.assert_array_equal(np.isnan(levels), np.isnan(every_byte))
    np.testing.assert_array_equal(levels[~np.isnan(levels)], every_byte[~np.isnan(every_byte)])


def test_fp8_rounds_like_torchs_cast():
    import torch
    scheme = SCHEMES["fp8"]
    w = (np.random.default_rng(3).standard_normal((8, 512)) * np.geomspace(1e-3, 10, 512)).astype(np.float32)
    q = scheme.quantize(w)
    np.testing.assert_allclose(q.scales[:, 0], np.abs(w).max(axis=1) / 448, rtol=1e-6)
    ours = scheme.dequantize(q)
    scaled = torch.from_numpy(w / q.scales)
    theirs = scaled.to(torch.float8_e4m3fn).float().numpy() * q.scales
    assert np.mean(ours == theirs) > 0.999  # only exact ties may round differently (torch: to even)


@pytest.mark.parametrize("name", CODEBOOK_SCHEMES)
def test_codebook_schemes_pick_the_nearest_level(name):
    scheme = SCHEMES[name]
    w = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32)
    q = scheme.quantize(w)
    group = scheme.group_size or 256
    scale = np.repeat(q.scales, group, axis=1)
    levels = np.array(scheme.codebook, np.float64)
    distance = np.abs(w[..., None] / scale[..., None] - np.where(np.isnan(levels), np.inf, levels))
    np.testing.assert_array_equal(q.codes, distance.argmin(axis=-1))  # argmin: ties to the first level
    np.testing.assert_array_equal(scheme.dequantize(q), (levels[q.codes] * scale).astype(np.float32))
    assert q.zeros is None and np.all(np.abs(levels[q.codes]).max(axis=1) == np.abs(levels[~np.isnan(levels)]).max())


def test_nf4_levels_are_symmetric_quantiles_with_an_exact_zero():
    levels = np.array(SCHEMES["nf4g64"].codebook)
    assert levels[0] == -1 and levels[-1] == 1 and 0.0 in levels and np.all(np.diff(levels) > 0)


@pytest.mark.parametrize("name, bits, group, symmetric", [
    ("w4", 4, 0, True), ("w6g16-asym", 6, 16, False), ("w2g32", 2, 32, True)])
def test_integer_scheme_names_parse(name, bits, group, symmetric):
    scheme = get_scheme(name)
    assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.codebook) == (bits, group, symmetric, None)


@pytest.mark.parametrize("name", ["w9", "w4g0", "int4", "w4g128asym"])
def test_bad_scheme_names_are_refused(name):
    with pytest.raises(LLMOptError, match="unknown quantization scheme"):
        get_scheme(name)
