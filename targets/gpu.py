"""What the GPU targets (cuda, rocm, metal, webgpu) share: their linear kernels and dlight schedule
rules, imported lazily so that listing targets imports no TVM."""

from __future__ import annotations


def emit_linear(bb, x, w, bias, out_features=None):
    from ..codegen.kernels.gpu_linear import emit_linear as emit
    return emit(bb, x, w, bias, out_features)


def emit_quant_linear(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features):
    """Decode (one row): the fused dequantize-GEMV; prefill: dequantize, then the tiled NT matmul."""
    from ..codegen.kernels.gpu_linear import emit_quant_linear as emit
    return emit(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features)


def emit_fused_quant_linear(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features):
    """The fused dequantize-matmul for every number of rows: for targets whose schedule rules leave
    out dlight's Matmul rule (webgpu), where a dequantized weight would buy prefill no better schedule."""
    from ..codegen.kernels.gpu_linear import emit_fused_quant_linear as emit
    return emit(bb, x, packed, scales, zeros, bias, scheme, out_features, in_features)


def quant_linear_supports(scheme, out_features, in_features):
    from ..codegen.kernels.gpu_linear import supports_quant_linear
    return supports_quant_linear(scheme, out_features, in_features)


def schedule_rules():
    """dlight's GPU rules: tiled matmuls (prefill), GEMV (decode), reductions, and a fallback."""
    from tvm.s_tir import dlight
    return [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback()]


def shared_fields(**overrides) -> dict:
    """The TargetSpec fields every GPU target shares (its kernels, schedule rules and dtypes), with
    ``overrides`` for a target that differs (e.g. webgpu's rules): ``TargetSpec(..., **shared_fields())``."""
    return {"emit_linear": emit_linear, "schedule_rules": schedule_rules, "emit_quant_linear": emit_quant_linear,
            "quant_linear_supports": quant_linear_supports, "dtypes": ("fp32", "fp16"), **overrides}


def arch_toolchain(toolchain: str, archs) -> tuple:
    """``(check_toolchain, compile_context)`` hooks of a multi-arch target: each imports
    ``codegen/<toolchain>.py`` when called and passes it the requested archs (``archs(arch)``)."""
    import importlib

    def module():
        return importlib.import_module(f"..codegen.{toolchain}", __package__)

    def check_toolchain(arch):
        module().check_toolchain(archs(arch))

    def compile_context(arch):
        return module().compile_context(archs(arch))

    return check_toolchain, compile_context
