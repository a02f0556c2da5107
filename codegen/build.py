"""Compile an IR module for a target: IR -> Relax -> TVM executable."""

from __future__ import annotations

import tvm

from ..ir.graph import Module
from ..targets import TargetSpec, check_arch
from .relax_module import default_emit_linear, to_relax


def compile_module(module: Module, spec: TargetSpec, arch: str | None = None):
    """(TVM executable, the TVM target in dict form) for ``module`` on ``spec``."""
    check_arch(spec, arch)
    target_dict = spec.tvm_target(arch)
    target = tvm.target.Target(target_dict)
    with target:  # lowerings and compile callbacks read Target.current()
        relax_mod = to_relax(module, spec.emit_linear or default_emit_linear)
        executable = tvm.compile(relax_mod, target)
    return executable, target_dict
