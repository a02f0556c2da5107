"""What differs between targets, as data: one ``TargetSpec`` per target, found by name.

The pipeline never branches on a target's name: it asks the spec for the TVM target, the
kernels to use for ``linear``, the library file it exports and what the device needs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LLMOptError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    device: str  # the runtime device kind: cpu, cuda, rocm, metal, webgpu
    library_file: str  # the compiled library's file name inside the artifact
    tvm_target: Callable[[str | None], dict]  # arch (or None for the default) -> TVM target, dict form
    device_needs: str  # what must be installed on the device to load the artifact
    emit_linear: Callable | None = None  # (bb, x, w, bias, out_features=None) -> relax.Expr; None: Relax linear
    emit_attention: Callable | None = None  # fused attention kernel; None: Relax ops
    # linear(x, dequantize(packed, scales[, zeros])) as one kernel (codegen/quant_fusion.py):
    # (bb, x, packed, scales, zeros, bias, scheme, out_features, in_features) -> relax.Expr, for the
    # (scheme, out_features, in_features) that quant_linear_supports accepts; None: generic dequantize
    emit_quant_linear: Callable | None = None
    quant_linear_supports: Callable | None = None
    schedule_rules: Callable[[], list] | None = None  # () -> dlight-style rules for the remaining PrimFuncs
    # () -> layout (pack, packed_shape, description) of linear weights and of fused quantized parts
    linear_weight_layout: Callable[[], Any] | None = None
    archs: tuple[str, ...] = field(default_factory=tuple)  # accepted --arch values (empty: free form)
    # free-form archs: (arch) -> None if the target knows it, else a hint naming what it accepts
    check_free_arch: Callable[[str], str | None] | None = None
    arch_help: str = ""  # what --arch takes, in words (for `llmopt targets`)
    build_needs: str = ""  # what the build machine needs besides llmopt's Python dependencies
    multi_arch: bool = False  # --arch may name several archs, comma-separated (one library for all of them)
    default_archs: tuple[str, ...] = ()  # what a multi-arch target compiles for when --arch is left out
    # (arch) -> None, or an LLMOptError naming what to install: checked before any model work
    check_toolchain: Callable[[str | None], None] | None = None
    # (arch) -> context around tvm.compile that makes the device compiler available; None: nothing needed
    compile_context: Callable[[str | None], AbstractContextManager] | None = None
    # (executable, arch) -> what the artifact exports in its place: an object whose export_library(path)
    # writes the library and the files the device loads beside it (e.g. a web page); None: the executable
    package_library: Callable[[Any, str | None], Any] | None = None
    dtypes: tuple[str, ...] = ("fp32",)  # --dtype values it has kernels for
    fp16_activations: bool = True  # --dtype fp16 computes in f16 (GPUs); False: f16 weights, f32 compute
    compact_sparse: bool = False  # its kernels read N:M-sparse weights as values + indices (compact-sparse)
    int8_activations: bool = False  # it has W4A8 kernels (linear_w4a8: int8 activations x 4-bit weights)


class UnknownTargetError(LLMOptError):
    pass


def requested_archs(spec: TargetSpec, arch: str | None) -> tuple[str, ...]:
    """The archs ``--arch`` names: for a multi-arch target each of a comma list (None: its
    ``default_archs``), else ``arch`` itself (None: ``()``, the target's default)."""
    if arch is None:
        return spec.default_archs
    if spec.multi_arch:
        return tuple(a.strip() for a in arch.split(","))
    return (arch,)


def check_arch(spec: TargetSpec, arch: str | None) -> None:
    """UnknownTargetError unless ``arch`` (None: the default) is one ``spec`` accepts; a multi-arch
    target checks every arch of a comma list."""
    if arch is None:
        return
    if spec.multi_arch:
        archs = requested_archs(spec, arch)
        if "" in archs or len(set(archs)) != len(archs):
            raise UnknownTargetError(f"target {spec.name}: --arch {arch!r} is not a list of distinct archs.",
                                     f"Write e.g. --arch {','.join(spec.default_archs or spec.archs[:2])}.")
        for one in archs:
            _check_one_arch(spec, one)
        return
    _check_one_arch(spec, arch)


def _check_one_arch(spec: TargetSpec, arch: str) -> None:
    if spec.archs and arch not in spec.archs:
        raise UnknownTargetError(f"target {spec.name}: unknown --arch {arch!r}.",
                                 f"Known archs: {', '.join(spec.archs)}.")
    hint = spec.check_free_arch(arch) if not spec.archs and spec.check_free_arch else None
    if hint:
        raise UnknownTargetError(f"target {spec.name}: unknown --arch {arch!r}.", hint)
