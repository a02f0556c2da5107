"""``quantize-rtn``: round-to-nearest weight quantization of every ``linear`` that reads a stored weight.

Options: ``scheme`` (a scheme name, see ``ir/quant_schemes.py``; default ``w4g128``) and ``rules``
(per-layer schemes, ``pattern=scheme`` separated by ``;``, first match wins, ``skip`` keeps float;
default ``lm_head=skip``; see ``LayerRules`` in ``passes/quant/rewrite.py``).

Requires: verified IR. Guarantees: the weight operand of every ``linear`` whose weight is a
``weight`` node of static f32 type ``[N, K]`` (any ``K > 0``: when the scheme's group size does not
divide it, the last group is short) whose scheme is not ``skip``, becomes ``dequantize`` of derived
low-bit weights holding the scheme's round-to-nearest codes (``quantize_linears`` in ``rewrite.py``). Nothing is quantized
while the pass runs: the derived weights' loaders quantize the source weight when asked, a block of
rows at a time (so the temporaries stay small next to the weight). New nodes
carry ``created_by="quantize-rtn"`` and the linear's ``source``. Embedding tables: an ``embedding``
reading a static f32 weight reads ``dequantize`` of its derived weights when a rule matching the
embedding (``embed_tokens=w4g32``) names a scheme, or, with no matching rule, when a linear reading
the same weight (a tied LM head) is quantized: then both read one ``dequantize`` of one set of codes
(``LayerRules.table_scheme_for``); the default scheme alone never quantizes a table.

Stats: ``quantized`` linears, ``weights_quantized`` distinct (weight, scheme) pairs,
``skipped_shape`` linears left in float because their weight does not fit the scheme's groups, and
``tables_quantized`` embeddings (only when some are).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ir.graph import Module
from ...ir.quant_schemes import QuantizedWeight, Scheme
from ..base import Pass, PassResult
from .rewrite import LayerRules, quantize_linears, row_blocks


def quantize_by_rows(scheme: Scheme, w: np.ndarray) -> QuantizedWeight:
    """``scheme.quantize(w)`` a block of rows at a time (``row_blocks``): the same codes, scales and
    zeros, while the temporaries are a few copies of one block instead of several copies of ``w``."""
    parts = [scheme.quantize(w[rows]) for rows in row_blocks(*w.shape)]
    return QuantizedWeight(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                           None if parts[0].zeros is None else np.concatenate([p.zeros for p in parts]))


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
                                produce=lambda name, scheme: quantize_by_rows(scheme, store.get(name)), tables=rules)
