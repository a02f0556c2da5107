"""SmoothQuant's smoothing: move activation outliers into the weights, leaving the function unchanged.

For a linear ``y = x @ W.T`` and a positive per-input-channel factor ``s[K]``,
``y = (x / s) @ (W * s).T``: dividing the activations' channels by ``s`` flattens their outliers,
multiplying the weight's columns by ``s`` takes them over. ``smoothing_factors`` picks
``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (SmoothQuant, Xiao et al. 2023).

``smooth_linears(module, factors, pass_name)`` rewrites the graph in float:

- each ``linear`` whose stored weight ``w`` has a factor reads the derived weight ``<w>.smoothquant``
  (``W * s``, computed when loaded);
- its input is divided by ``s``: folded into the weight of the ``rms_norm`` that produces it (the
  derived ``<g>.smoothquant`` = ``g / s``) when that norm weight is read only by norms whose
  every reader is a linear with this same ``s`` (in every function), else an explicit
  ``mul(x, <w>.smoothquant.inv_scale)`` (``1 / s``; one per input value and factor).

Linears that read one input value should share one factor array (the same object): ``factors``
maps weight names to arrays, and weights mapped to one array form one group. Stats: ``smoothed``
linears, ``folded`` norm weights, ``scaled`` inserted ``mul`` nodes.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ...ir.graph import Builder, Function, Module, Node
from ...ir.types import TensorType
from ...ir.weights import WeightStore
from ..base import PassResult, map_functions
from ..rewrite import rebuild, renamed
from .rewrite import linear_weights

MIN_FACTOR_INPUT = 1e-5  # floor of max|X_j| and max|W_j| before the powers (SmoothQuant's clamp)


def smoothing_factors(act_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """f32 ``s[K] = max|X_j|^alpha / max|W_j|^(1 - alpha)`` from per-channel maxima."""
    act = np.maximum(act_max.astype(np.float64), MIN_FACTOR_INPUT)
    weight = np.maximum(weight_max.astype(np.float64), MIN_FACTOR_INPUT)
    return np.maximum(act ** alpha / weight ** (1 - alpha), MIN_FACTOR_INPUT).astype(np.float32)


def smoothed_name(weight: str) -> str:
    return f"{weight}.smoothquant"


def _foldable_norms(module: Module, factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """norm weight name -> the factor it can absorb (see the module docstring)."""
    candidate: dict[str, np.ndarray] = {}
    blocked: set[str] = set()
    for func in module.functions.values():
        weights = {n.name: n.attr["name"] for n in func.nodes if n.op == "weight"}
        users, linears = func.users(), linear_weights(func)
        for node in func.nodes:
            for index, value in enumerate(node.inputs):
                if value in weights and (node.op != "rms_norm" or index != 1):
                    blocked.add(weights[value])
            if node.op != "rms_norm" or node.inputs[1] not in weights:
                continue
            readers = users.get(node.name, [])
            found = [factors.get(linears[r.name].attr["name"]) if r.name in linears and r.inputs[0] == node.name
                     else None for r in readers]
            name = weights[node.inputs[1]]
            first = found[0] if found else None
            if first is None or any(f is not first for f in found) or candidate.setdefault(name, first) is not first:
                blocked.add(name)
        blocked.update(weights[value] for _, value in func.outputs if value in weights)
    return {name: s for name, s in candidate.items() if name not in blocked}


def _derived_store(module: Module, factors: dict[str, np.ndarray], folded: dict[str, np.ndarray],
                   pass_name: str) -> tuple[WeightStore, dict[int, str]]:
    """The old entries plus the smoothed weights, folded norms and ``1 / s`` vectors; and the name of
    each factor's ``1 / s`` vector, by ``id`` of the factor."""
    old = module.weights
    store = WeightStore()
    for name in old:
        entry = old.entry(name)
        store.add(name, entry.type, entry.load, entry.origin)

    def add(name: str, type: TensorType, load, what: str) -> None:
        store.add(name, type, load, origin=f"{pass_name}: {what}")

    inverse_names: dict[int, str] = {}
    for weight, s in sorted(factors.items()):
        add(smoothed_name(weight), old.type(weight), lambda w=weight, s=s: old.get(w) * s[None, :],
            f"{weight} * s")
        if id(s) not in inverse_names:
            inverse_names[id(s)] = f"{smoothed_name(weight)}.inv_scale"
            add(inverse_names[id(s)], TensorType("f32", s.shape), lambda s=s: (1 / s).astype(np.float32),
                f"1 / s of {weight}")
    for norm, s in folded.items():
        add(smoothed_name(norm), old.type(norm), lambda g=norm, s=s: old.get(g) / s, f"{norm} / s")
    return store, inverse_names


def smooth_linears(module: Module, factors: dict[str, np.ndarray], pass_name: str) -> PassResult:
    """The module with every linear of ``factors`` smoothed (see the module docstring)."""
    folded = _foldable_norms(module, factors)
    store, inverse_names = _derived_store(module, factors, folded, pass_name)

    def rewrite(func: Function) -> tuple[Function, Counter]:
        stats = Counter(smoothed=0, scaled=0)
        linears = linear_weights(func)
        producers = func.node_map()
        scaled: dict[tuple[str, int], str] = {}  # (input value, id of factor) -> x / s

        def smoothed_input(x: str, s: np.ndarray, b: Builder, rename: dict[str, str]) -> str:
            norm = producers.get(x)
            norm_weight = producers.get(norm.inputs[1]) if norm is not None and norm.op == "rms_norm" else None
            if norm_weight is not None and folded.get(norm_weight.attr.get("name")) is s:
                return rename[x]
            if (x, id(s)) not in scaled:
                name = inverse_names[id(s)]
                inverse = b.add("weight", type=store.type(name), name=name)
                scaled[x, id(s)] = b.add("mul", rename[x], inverse)
                stats["scaled"] += 1
            return scaled[x, id(s)]

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            name = node.attr.get("name")
            if node.op == "weight" and name in folded:
                return b.add("weight", type=node.type, name=smoothed_name(name))
            weight = linears.get(node.name)
            s = factors.get(weight.attr["name"]) if weight is not None else None
            if s is None:
                return None
            inputs = list(renamed(node, rename))
            inputs[0] = smoothed_input(node.inputs[0], s, b, rename)
            inputs[1] = b.add("weight", type=weight.type, name=smoothed_name(weight.attr["name"]))
            stats["smoothed"] += 1
            return b.copy_node(node, tuple(inputs))

        return rebuild(func, replace, pass_name), stats

    result = map_functions(module, rewrite, weights=store)
    return PassResult(result.module, {**result.stats, "folded": len(folded)})
