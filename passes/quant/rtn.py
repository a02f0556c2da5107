"""``quantize-rtn``: round-to-nearest weight quantization of every ``linear`` that reads a stored weight.

Options: ``scheme`` (a scheme name, see ``ir/quant_schemes.py``; default ``w4g128``) and ``rules``
(per-layer schemes, ``pattern=scheme`` separated by ``;``, first match wins, ``skip`` keeps float;
default ``lm_head=skip``; see ``LayerRules`` in ``passes/quant/rewrite.py``).

Requires: verified IR. Guarantees: the weight operand of every ``linear`` whose weight is a
``weight`` node of static f32 type ``[N, K]``, whose scheme is not ``skip`` and whose ``K`` is a
multiple of the scheme's group size, becomes ``dequantize`` of derived low-bit weights holding the
scheme's round-to-nearest codes (``quantize_linears`` in ``rewrite.py``). Nothing is quantized
while the pass runs: the derived weights' loaders quantize the source weight when asked. New nodes
carry ``created_by="quantize-rtn"`` and the linear's ``source``.

Stats: ``quantized`` linears, ``weights_quantized`` distinct (weight, scheme) pairs,
``skipped_shape`` linears left in float because their weight does not fit the scheme's groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...ir.graph import Module
from ..base import Pass, PassResult
from .rewrite import LayerRules, quantize_linears


@dataclass(frozen=True)
class QuantizeRTN(Pass):
    """Quantize linear weights round-to-nearest; the graph dequantizes them before each linear."""

    name = "quantize-rtn"
    scheme: str = "w4g128"
    rules: str = "lm_head=skip"

    def apply(self, module: Module) -> PassResult:
        rules = LayerRules(self.scheme, self.rules)
        store = module.weights
        return quantize_linears(module, self.name,
                                choose=lambda linear, weight: rules.scheme_for(linear.source, weight.attr["name"]),
                                produce=lambda name, scheme: scheme.quantize(store.get(name)))
