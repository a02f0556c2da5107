"""Compile an IR module for a target: IR -> Relax -> TVM executable."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm

from ..ir.graph import Module
from ..targets import TargetSpec, check_arch, requested_archs
from .shape_func_order import sort_shape_func_stores
from .relax_module import Kernels, default_emit_linear, to_relax, weight_order
from .weight_layout import packed_weights


@dataclass
class CompiledLibrary:
    """A compiled module and how its weights must be stored for it."""

    executable: Any
    target: dict  # the TVM target, dict form
    packed: set[str]  # weights stored in ``layout``
    layout: Any
    archs: tuple[str, ...] = ()  # the archs compiled for (--arch's list, or the target's default ones)

    def stored_weights(self, module: Module):
        """(name, array) in the library's parameter order and layout, loaded one at a time."""
        for name in weight_order(module):
            array = module.weights.get(name)
            yield name, (self.layout.pack(array) if name in self.packed else np.ascontiguousarray(array))

    def layout_note(self) -> dict:
        return {"packed": sorted(self.packed), "layout": self.layout.description} if self.packed else {}


def relax_pipeline(spec: TargetSpec, target: tvm.target.Target):
    """TVM's default Relax pipeline for the target, with the target's schedule rules applied to
    the fused PrimFuncs between legalization and lowering (kernels of ours are left alone), and
    the shape functions put in a fixed order (reproducible builds)."""
    if spec.schedule_rules is None:
        return tvm.transform.Sequential([tvm.relax.get_default_pipeline(target), sort_shape_func_stores])
    # the generic stages (CUDA's differ only by RewriteCUDAGraph, which is off unless configured)
    from tvm.relax.backend.cpu_generic import pipeline as stages
    from tvm.s_tir import dlight
    return tvm.transform.Sequential(
        stages.library_dispatch_passes(target) + stages.legalize_passes(target)
        + [dlight.ApplyDefaultSchedule(*spec.schedule_rules())]
        + stages.dataflow_lower_passes(target) + stages.finalize_passes(target) + [sort_shape_func_stores])


def compile_module(module: Module, spec: TargetSpec, arch: str | None = None) -> CompiledLibrary:
    """Compile ``module`` for ``spec`` (and ``arch``); weights stay out of the library."""
    check_arch(spec, arch)
    if spec.check_toolchain is not None:
        spec.check_toolchain(arch)
    target_dict = spec.tvm_target(arch)
    target = tvm.target.Target(target_dict)
    layout = spec.linear_weight_layout() if spec.linear_weight_layout else None
    fuses = spec.quant_linear_supports if spec.emit_quant_linear else None
    with target:  # lowerings, kernel predicates and compile callbacks read Target.current()
        packed = packed_weights(module, fuses) if layout is not None else set()
        kernels = Kernels(spec.emit_linear or default_emit_linear, spec.emit_attention,
                          spec.emit_quant_linear, fuses)
        relax_mod = to_relax(module, kernels, layout, packed)
        with spec.compile_context(arch) if spec.compile_context else contextlib.nullcontext():
            executable = tvm.compile(relax_mod, target, relax_pipeline=relax_pipeline(spec, target))
    if spec.package_library is not None:
        executable = spec.package_library(executable, arch)
    return CompiledLibrary(executable, target_dict, packed, layout, requested_archs(spec, arch))
