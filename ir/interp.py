"""The reference interpreter: runs a function with numpy, node by node, using each op's semantics.

It is the executable definition of the IR. Tests compare it with transformers and with compiled
artifacts; pass tests compare it before and after a pass. ``on_node`` lets callers observe every
value (calibration statistics, per-layer error reports).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .graph import Function, Module, Node
from .ops import OPS
from .types import DTYPES, TensorType, eval_dim


def bind_symbols(func: Function, inputs: dict[str, np.ndarray]) -> dict[str, int]:
    """Values of the symbolic dims, read off the inputs' shapes (plain symbols only)."""
    env: dict[str, int] = {}
    for param in func.params:
        value = inputs[param.name]
        if value.ndim != param.type.rank:
            raise ValueError(f"input %{param.name} has rank {value.ndim}, expected {param.type}")
        for dim, size in zip(param.type.shape, value.shape):
            if isinstance(dim, str) and dim.isidentifier():
                if env.setdefault(dim, size) != size:
                    raise ValueError(f"symbol {dim} is both {env[dim]} and {size}")
            elif isinstance(dim, int) and dim != size:
                raise ValueError(f"input %{param.name} has shape {value.shape}, expected {param.type}")
    return env


def run(func: Function, inputs: dict[str, np.ndarray], weights,
        on_node: Callable[[Node, np.ndarray], None] | None = None) -> dict[str, np.ndarray]:
    """Run ``func`` on ``inputs`` (name -> array); return its outputs by name."""
    missing = [p.name for p in func.params if p.name not in inputs]
    if missing:
        raise ValueError(f"@{func.name} needs inputs {', '.join(missing)}")
    values = {p.name: np.asarray(inputs[p.name], dtype=DTYPES[p.type.dtype]) for p in func.params}
    env = bind_symbols(func, values)
    last_use = {}
    for index, node in enumerate(func.nodes):
        for name in node.inputs:
            last_use[name] = index
    kept = {value for _, value in func.outputs}
    for index, node in enumerate(func.nodes):
        if node.op == "weight":
            result = weights.get(node.attr["name"])
        else:
            result = evaluate(node, [values[i] for i in node.inputs], env)
        result = np.asarray(result)
        expected = _concrete(node.type, env)
        if result.shape != expected or result.dtype != DTYPES[node.type.dtype]:
            raise AssertionError(f"interpreter: %{node.name} = {node.op} gave {result.dtype}{list(result.shape)}, "
                                 f"type says {node.type} = {expected}")
        values[node.name] = result
        if on_node is not None:
            on_node(node, result)
        for name in node.inputs:  # free what no later node reads
            if last_use.get(name) == index and name not in kept:
                values.pop(name, None)
    return {name: values[value] for name, value in func.outputs}


def evaluate(node: Node, args: list[np.ndarray], env: dict[str, int]) -> np.ndarray:
    """``node``'s value from its operands. f16 is a storage type: an op reading f16 operands
    computes in f32 and rounds its result to its own dtype (as kernels accumulating in f32 do)."""
    if not any(arg.dtype == np.float16 for arg in args):
        return OPS[node.op].ref(args, node.attr, env)
    widened = [arg.astype(np.float32) if arg.dtype == np.float16 else arg for arg in args]
    return np.asarray(OPS[node.op].ref(widened, node.attr, env)).astype(DTYPES[node.type.dtype])


def _concrete(type: TensorType, env: dict[str, int]) -> tuple[int, ...]:
    return tuple(eval_dim(d, env) for d in type.shape)


def run_module(module: Module, entry: str, inputs: dict[str, np.ndarray], **kw) -> dict[str, np.ndarray]:
    return run(module.functions[entry], inputs, module.weights, **kw)


def cache_buffers(cache: dict[str, np.ndarray], capacity: int) -> dict[str, np.ndarray]:
    """Decode's cache buffers: each ``[1, rows, ...]`` array zero-padded to ``capacity`` rows (the
    ``capacity`` of a decoder's decode params; rows past the filled ones are never read)."""
    def padded(array: np.ndarray) -> np.ndarray:
        if array.shape[1] > capacity:
            raise ValueError(f"a cache of {array.shape[1]} rows does not fit {capacity}")
        return np.concatenate([array, np.zeros((array.shape[0], capacity - array.shape[1], *array.shape[2:]),
                                               array.dtype)], axis=1)
    return {name: padded(array) for name, array in cache.items()}


__all__ = ["run", "run_module", "evaluate", "bind_symbols", "cache_buffers"]
