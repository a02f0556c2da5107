"""Rotary position embedding frequencies, shared by the interpreter and codegen.

Scaling follows the Hugging Face ``rope_scaling`` / ``rope_parameters`` conventions: ``default``,
``linear`` (positions divided by ``factor``) and ``llama3`` (frequency-dependent smoothing).
"""

from __future__ import annotations

import math

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
             low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
             original_max_position: int = 8192) -> np.ndarray:
    """float64[head_dim // 2] inverse frequencies, scaled as ``rope_type`` says."""
    base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope_type == "default":
        return base
    if rope_type == "linear":
        return base / factor
    if rope_type == "llama3":
        low_wavelen = original_max_position / low_freq_factor
        high_wavelen = original_max_position / high_freq_factor
        wavelen = 2 * math.pi / base
        scaled = np.where(wavelen > low_wavelen, base / factor, base)
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled)
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


def rope_attrs_inv_freq(head_dim: int, attrs: dict) -> np.ndarray:
    """``inv_freq`` from a ``rope`` node's attributes."""
    return inv_freq(head_dim, attrs["theta"], attrs.get("rope_type", "default"),
                    attrs.get("factor", 1.0), attrs.get("low_freq_factor", 1.0),
                    attrs.get("high_freq_factor", 4.0), attrs.get("original_max_position", 8192))
