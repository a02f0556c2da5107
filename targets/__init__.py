"""The target registry: ``targets/<name>.py`` defines ``TARGET``; ``get_target(name)`` finds it
(cpu.py: this machine's CPU; cuda.py, rocm.py, metal.py, webgpu.py: GPUs). ``base.py`` and ``gpu.py``
(what the GPU targets share) are not targets."""

from __future__ import annotations

import importlib
import pkgutil

from .base import TargetSpec, UnknownTargetError, check_arch, requested_archs

_NOT_TARGETS = {"base", "gpu"}


def target_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_TARGETS)


def get_target(name: str) -> TargetSpec:
    if name not in target_names():
        raise UnknownTargetError(f"unknown target {name!r}.", f"Known targets: {', '.join(target_names())}.")
    return importlib.import_module(f"{__name__}.{name}").TARGET


def check_dtype(spec: TargetSpec, dtype: str) -> None:
    """UnknownTargetError unless ``spec`` has kernels for ``--dtype dtype``."""
    if dtype in spec.dtypes:
        return
    others = [name for name in target_names() if dtype in get_target(name).dtypes]
    cpu_hint = ", or --quant w8 for a smaller, faster CPU artifact" if spec.device == "cpu" else ""
    raise UnknownTargetError(f"target {spec.name}: --dtype {dtype} is not supported (it builds "
                             f"{', '.join(spec.dtypes)}).",
                             f"Leave out --dtype {dtype}{cpu_hint}; {dtype} is built for {', '.join(others)}.")


__all__ = ["TargetSpec", "get_target", "target_names", "check_arch", "check_dtype", "requested_archs",
           "UnknownTargetError"]
