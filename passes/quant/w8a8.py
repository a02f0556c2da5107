"""The W8A8 rewrite: a float ``linear`` becomes ``linear_w8a8``, int8 activations times int8 weights.

``w8a8_linears(module, weights, pass_name)`` replaces each ``linear`` that reads one of the stored
f32 ``[N, K]`` weights named in ``weights`` with ``linear_w8a8(x, packed, scales[, bias])``
(ir/int8_ops.py: ``x`` is quantized per token at run time, int32 accumulation), where ``packed`` and
``scales`` are the weight's round-to-nearest codes of the ``w8`` scheme (symmetric int8 per output
channel), registered as the derived weights ``<w>.w8.packed`` / ``<w>.w8.scales``
(``DerivedWeights`` in rewrite.py: computed when loaded, one set per weight). The float weight
node stays for ``dce``. Stats: ``quantized`` linears, ``weights_quantized`` distinct weights.
"""

from __future__ import annotations

from collections import Counter

from ...ir.graph import Builder, Function, Module, Node
from ...ir.int8_ops import W8A8_WEIGHT_SCHEME
from ...ir.quant_schemes import get_scheme
from ..base import PassResult, map_functions
from ..rewrite import rebuild, renamed
from .rewrite import DerivedWeights, linear_weights


def w8a8_linears(module: Module, weights: set[str], pass_name: str) -> PassResult:
    """``module`` with the linears reading ``weights`` in W8A8 (see the module docstring)."""
    store = module.weights
    derived = DerivedWeights(store, lambda name, scheme: scheme.quantize(store.get(name)), pass_name)
    scheme = get_scheme(W8A8_WEIGHT_SCHEME)

    def rewrite(func: Function) -> tuple[Function, Counter]:
        stats = Counter(quantized=0)
        linears = linear_weights(func)

        def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
            weight = linears.get(node.name)
            if weight is None or weight.attr["name"] not in weights:
                return None
            names = derived.derive(weight.attr["name"], weight.type, scheme)
            parts = [b.add("weight", type=derived.store.type(name), name=name) for name in names.values()]
            x, _, *bias = renamed(node, rename)
            stats["quantized"] += 1
            return b.add("linear_w8a8", x, *parts, *bias)

        return rebuild(func, replace, pass_name), stats

    result = map_functions(module, rewrite, weights=derived.store)
    return PassResult(result.module, {**result.stats, "weights_quantized": len(derived.by_source)})
