"""The host CPU through LLVM: compiled and run on this machine."""

from __future__ import annotations

import os

from .base import TargetSpec


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (``"native"`` silently means generic in TVM 0.27)."""
    import tvm.target.codegen
    return str(tvm.target.codegen.llvm_get_system_cpu())


def cpu_target(arch: str | None) -> dict:
    """``arch``: an LLVM CPU name (e.g. ``skylake-avx512``); default: this machine's CPU."""
    return {"kind": "llvm", "mcpu": arch or host_cpu_name(), "num-cores": os.cpu_count() or 1}


def check_cpu_arch(arch: str) -> str | None:
    """None if LLVM knows ``arch`` as a CPU of this machine's kind (LLVM itself would only warn and
    compile for a generic CPU), else a hint."""
    import tvm.target.codegen
    if tvm.target.codegen.llvm_is_valid_cpu(arch, str(tvm.target.codegen.llvm_get_system_triple())):
        return None
    return (f"--arch takes an LLVM CPU name of this machine's kind, e.g. {host_cpu_name()} (this machine's CPU, "
            "the default when --arch is left out).")


def _emit_linear(bb, x, w, bias, out_features=None):
    import tvm

    from ..codegen.kernels.cpu_linear import emit_linear
    return emit_linear(bb, x, w, bias, tvm.target.Target.current(), out_features=out_features)


def _emit_attention(bb, q, k, v, **shape):
    from ..codegen.kernels.cpu_attention import emit_attention
    return emit_attention(bb, q, k, v, **shape)


def _emit_quant_linear(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features):
    import tvm

    from ..codegen.kernels.cpu_quant_linear import emit_quant_linear
    return emit_quant_linear(bb, x, packed, scales, zeros, bias, scheme=scheme, out_features=out_features,
                             in_features=in_features, target=tvm.target.Target.current())


def _quant_linear_supports(scheme, out_features, in_features):
    import tvm

    from ..codegen.kernels.cpu_quant_linear import supports
    target = tvm.target.Target.current() or tvm.target.Target(cpu_target(None))
    return supports(scheme, out_features, in_features, target)


def _schedule_rules():
    from ..codegen.kernels.cpu_fallback import CPUFallback
    return [CPUFallback()]


def _linear_weight_layout():
    from ..codegen.kernels.cpu_quant_linear import STORED_LAYOUT
    return STORED_LAYOUT


TARGET = TargetSpec(
    name="cpu",
    description="this machine's CPU (LLVM), x86-64 or aarch64",
    device="cpu",
    library_file="model.so",
    tvm_target=cpu_target,
    device_needs="the TVM runtime (pip install apache-tvm), numpy, safetensors, tokenizers",
    emit_linear=_emit_linear,
    emit_attention=_emit_attention,
    emit_quant_linear=_emit_quant_linear,
    quant_linear_supports=_quant_linear_supports,
    schedule_rules=_schedule_rules,
    linear_weight_layout=_linear_weight_layout,
    check_free_arch=check_cpu_arch,
    arch_help="an LLVM CPU name of this machine's kind, e.g. skylake-avx512 (default: this machine's CPU)",
)
