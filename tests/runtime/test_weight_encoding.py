"""The fill-bitmask encoding of pruned weights (runtime/weight_encoding.py): bit-exact round trips
for every unit width, the sizes it promises, the web page's decoder agreeing with Python's, and the
refusals of damaged parts."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from llmopt.runtime import weight_encoding as we

RNG = np.random.default_rng(0)
PAGE = Path(__file__).resolve().parents[2] / "web" / "page" / "llmopt_webgpu.js"


def _sparse_f32(shape, density):
    w = RNG.standard_normal(shape).astype(np.float32)
    return np.where(RNG.random(shape) < density, w, np.float32(0))


def _packed_int4(rows, k, density, zero_code=8):
    """u32 words of 8 4-bit codes each (low nibble first), ``zero_code`` where a weight was pruned."""
    codes = np.where(RNG.random((rows, k)) < density, RNG.integers(0, 16, (rows, k)), zero_code).astype(np.uint32)
    shifts = (4 * np.arange(8, dtype=np.uint32))
    return (codes.reshape(rows, k // 8, 8) << shifts).sum(axis=-1, dtype=np.uint32), codes


def _round_trip(array):
    encoded = we.encode("w", array)
    assert encoded is not None
    encoding, mask, values = encoded
    decoded = we.decode(encoding, mask, values, array.shape, array.dtype.name)
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tobytes() == array.tobytes()  # bit for bit
    return encoding, mask, values


def test_unstructured_f32_round_trips_and_stores_53_percent():
    w = _sparse_f32((256, 384), density=0.5)
    w[0, :4] = [np.nan, -0.0, np.inf, 1e-45]  # odd bit patterns survive (-0.0 is not the fill)
    encoding, mask, values = _round_trip(w)
    assert (encoding.unit_bits, encoding.fill) == (32, 0)
    kept = int(np.count_nonzero(w.view(np.uint32)))
    assert encoding.kept == kept and values.nbytes == 4 * kept and mask.nbytes == w.size // 8
    assert 0.52 < (mask.nbytes + values.nbytes) / w.nbytes < 0.54


def test_f16_uses_16_bit_units():
    w = _sparse_f32((128, 256), density=0.3).astype(np.float16)
    encoding, mask, values = _round_trip(w)
    assert encoding.unit_bits == 16 and values.nbytes == 2 * np.count_nonzero(w.view(np.uint16))


@pytest.mark.parametrize("zero_code", [8, 7])  # symmetric int4's level 0, NF4's
def test_int4_codes_use_nibbles_and_their_zero_code_as_fill(zero_code):
    packed, codes = _packed_int4(96, 512, density=0.5, zero_code=zero_code)
    encoding, mask, values = _round_trip(packed)
    kept = int(np.count_nonzero(codes != zero_code))
    assert (encoding.unit_bits, encoding.fill, encoding.kept) == (4, zero_code, kept)
    assert values.nbytes == (kept + 1) // 2 and mask.nbytes == codes.size // 8
    # 1 mask bit + 4 bits per kept code (the random kept codes hit zero_code 1/16 of the time): ~2.9 of 4
    assert (mask.nbytes + values.nbytes) / packed.nbytes == pytest.approx((1 + 4 * 0.5 * 15 / 16) / 4, abs=0.01)


def test_w8_codes_use_bytes_with_128_as_fill():
    codes = np.where(RNG.random((64, 512)) < 0.4, RNG.integers(0, 256, (64, 512)), 128).astype(np.uint8)
    packed = codes.view(np.uint32)  # 4 codes to a word, as the w8 scheme stores them
    encoding, _, _ = _round_trip(packed)
    assert (encoding.unit_bits, encoding.fill) == (8, 128)


def test_odd_unit_counts_round_trip():
    w = np.zeros(4099, np.uint8)
    w[::3] = RNG.integers(1, 256, w[::3].size)
    encoding, mask, values = _round_trip(w)
    assert encoding.units in (4099, 8198)


def test_dense_and_small_tensors_are_left_plain():
    assert we.encode("dense", RNG.standard_normal((256, 256)).astype(np.float32)) is None
    assert we.encode("small", np.zeros(64, np.float32)) is None  # under MIN_BYTES
    # 10 % zeros saves under MIN_SAVING with 32-bit units (1/32 + 0.9 > 0.9)
    assert we.encode("mild", _sparse_f32((256, 256), density=0.9)) is None


def test_damaged_parts_are_refused():
    w = _sparse_f32((64, 128), density=0.5)
    encoding, mask, values = we.encode("w", w)
    with pytest.raises(ValueError, match="values hold"):
        we.decode(encoding, mask, values[:-4], w.shape, "float32")
    flipped = mask.copy()
    flipped[0] ^= 1
    with pytest.raises(ValueError, match="mask sets"):
        we.decode(encoding, flipped, values, w.shape, "float32")
    with pytest.raises(ValueError, match="not the"):
        we.decode(encoding, mask, values, (64, 64), "float32")
    with pytest.raises(TypeError, match="unknown weight encoding"):
        replace(encoding, kind="zstd")


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed (the WebGPU target's set-up)")
def test_the_web_page_decodes_what_python_encodes(tmp_path):
    """The browser loader (web/page/llmopt_webgpu.js weightBytes) rebuilds the same bytes."""
    cases = {"f32": _sparse_f32((64, 128), 0.5), "f16": _sparse_f32((64, 128), 0.4).astype(np.float16),
             "int4": _packed_int4(64, 256, 0.5)[0],
             "w8": np.where(RNG.random(8192) < 0.3, RNG.integers(0, 256, 8192), 128).astype(np.uint8)}
    payload = []
    for name, array in cases.items():
        encoding, mask, values = we.encode(name, array)
        payload.append({"name": name, "enc": encoding.__dict__,
                        "mask": base64.b64encode(mask.tobytes()).decode(),
                        "values": base64.b64encode(values.tobytes()).decode()})
    (tmp_path / "in.json").write_text(json.dumps(payload))
    script = tmp_path / "decode.cjs"
    script.write_text(f"""
const fs = require('fs');
const src = fs.readFileSync({json.dumps(str(PAGE))}, 'utf8');
const body = src.slice(src.indexOf('  function weightBytes'), src.indexOf('  function argmax'));
const weightBytes = eval('(' + body.trim().replace(/^function weightBytes/, 'function') + ')');
const out = {{}};
for (const c of JSON.parse(fs.readFileSync(process.argv[2], 'utf8'))) {{
  const tensors = {{[c.enc.mask]: {{data: Uint8Array.from(Buffer.from(c.mask, 'base64'))}},
                   [c.enc.values]: {{data: Uint8Array.from(Buffer.from(c.values, 'base64'))}}}};
  out[c.name] = Buffer.from(weightBytes({{name: c.name, encoding: c.enc}}, tensors, 'test')).toString('base64');
}}
console.log(JSON.stringify(out));
""")
    result = subprocess.run(["node", str(script), str(tmp_path / "in.json")], capture_output=True, text=True,
                            check=True)
    decoded = json.loads(result.stdout)
    for name, array in cases.items():
        assert base64.b64decode(decoded[name]) == array.tobytes(), name
