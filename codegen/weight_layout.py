"""Which weights a target stores in its kernels' packed layout instead of the IR's ``[N, columns]``.

A weight read only as the weight of ``linear`` nodes (and possibly as an ``embedding`` table,
which can gather rows from the packed layout too) is stored packed, once: so a tied embedding and
LM head share one copy. So is a weight read only as an operand of ``dequantize`` nodes that the
target's fused quantized-linear kernel absorbs (codegen/quant_fusion.py): its packed codes, scales
and zeros, each ``[N, columns]``, get the same layout, and so do the int8 codes and scales of
``linear_w8a8`` and the 4-bit codes and scales of ``linear_w4a8`` (whose CPU kernels read them blocked). An absorbed ``dequantize`` read as an
embedding table too (a tied embedding and LM head quantized alike) keeps its parts blocked, once:
the embedding gathers rows of the blocked parts (an ``embedding-dequantize`` use); parts read only
by embeddings have no linear kernel to serve and stay as the IR says. A weight read any other way
stays as the IR says.
"""

from __future__ import annotations

from ..ir.graph import Module, weight_reads
from .quant_fusion import SupportsQuantLinear, dequantize_uses, fused_dequantizes

FUSED_DEQUANTIZE = "fused-dequantize"  # the op name a use by an absorbed dequantize is recorded under
EMBEDDING_DEQUANTIZE = "embedding-dequantize"  # ... and a use by one an embedding gathers rows of
ANCHOR_USES = ({("linear", 1), ("linear_w8a8", 1), ("linear_w8a8", 2), ("linear_w4a8", 1), ("linear_w4a8", 2)}
               # uses read by a linear kernel
               | {(FUSED_DEQUANTIZE, i) for i in range(3)})
PACKABLE_USES = ANCHOR_USES | {("embedding", 1)} | {(EMBEDDING_DEQUANTIZE, i) for i in range(3)}


def weight_uses(module: Module, supports: SupportsQuantLinear | None = None) -> dict[str, set[tuple[str, int]]]:
    """weight name -> {(op, operand index)} over every function; an operand of a ``dequantize``
    that is absorbed (see ``supports``) is recorded as a ``fused-dequantize`` use when a linear
    kernel reads it and as an ``embedding-dequantize`` use when an embedding gathers its rows."""
    def readers(func):
        fused = fused_dequantizes(func, supports)
        return {name: {FUSED_DEQUANTIZE if op == "linear" else EMBEDDING_DEQUANTIZE for op, _ in ops}
                for name, ops in dequantize_uses(func).items() if name in fused}
    return weight_reads(module, readers)


def packed_weights(module: Module, supports: SupportsQuantLinear | None = None) -> set[str]:
    """Weights to store packed: read by a linear kernel (as a float weight, or as a part of a
    quantized one that ``supports`` fuses), and otherwise only as (a part of) an embedding table."""
    return {name for name, uses in weight_uses(module, supports).items()
            if uses & ANCHOR_USES and uses <= PACKABLE_USES}
