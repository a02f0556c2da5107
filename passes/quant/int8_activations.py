"""``int8-activations``: linears on symmetric 4-bit weights multiply int8 activations (W4A8).

Each ``linear(x, dequantize(packed, scales; scheme)[, bias])`` whose scheme is symmetric integer
4-bit codes in groups of 32, 64 or 128 (``w4g32``, ``w4g64``, ``w4g128``; ir/int8_ops.py ``w4a8_scheme``) becomes
``linear_w4a8(x, packed, scales[, bias]; scheme)``: x is quantized to int8 per (token, weight group)
at run time (``max|x| / 127`` per group, round half to even), each group's dot products are exact
int32 sums and the groups are combined in f32 (ir/int8_ops.py ``linear_w4a8_reference`` states it to the
rounding). On CPUs with AVX-512 VNNI the group sums are ``vpdpbusd`` instructions
(codegen/kernels/cpu_w4a8_linear.py), 2.5-3.7x the f32-activation GEMM on SmolLM2's prefill shapes;
the price is the activations' rounding (about 1% more output error per linear on SmolLM2, on top of
the 4-bit weights' 8-10%). llama.cpp's Q4_0 and Q8_0 do the same with blocks of 32.

Options: ``functions``: the entry points to rewrite, comma-separated (default all three,
``prefill,decode,logits``, so a token's logits are computed the same way in prefill and decode;
decode's VNNI GEMV reads the weights at up to the memory bandwidth, 1.3-1.65x the f32-activation int4
GEMV). Asymmetric, per-channel, 3-bit, 8-bit and codebook (NF4, FP8) schemes are left alone.

Requires: verified IR after a quantization pass (the ``dequantize`` nodes of ``quantize_linears``).
Guarantees: the named functions' eligible linears read the packed codes and scales directly through
``linear_w4a8``; a ``dequantize`` node no other node reads is left for ``dce``. Other functions and
linears are unchanged. New nodes carry ``created_by="int8-activations"`` and the linear's source.
Stats: ``rewritten`` linears, ``kept_f32`` 4-bit-or-other linears left with f32 activations in the
named functions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ...errors import LLMOptError
from ...ir.graph import Builder, Function, Module, Node
from ...ir.int8_ops import w4a8_scheme
from ...ir.ops import OpError
from ..base import Pass, PassResult, map_functions
from ..rewrite import rebuild, renamed

DEFAULT_FUNCTIONS = "prefill,decode,logits"


@dataclass(frozen=True)
class Int8Activations(Pass):
    """Rewrite linears on symmetric 4-bit weights to ``linear_w4a8`` in the named functions."""

    name = "int8-activations"
    functions: str = DEFAULT_FUNCTIONS

    def selected(self, module: Module) -> set[str]:
        names = {name.strip() for name in self.functions.split(",") if name.strip()}
        unknown = sorted(names - set(module.functions))
        if unknown:
            raise LLMOptError(f"int8-activations: functions={self.functions!r} names {', '.join(unknown)}, which "
                              f"the module does not have.",
                              f"Name some of: {', '.join(module.functions)}.")
        return names

    def apply(self, module: Module) -> PassResult:
        chosen = self.selected(module)

        def rewrite(func: Function) -> tuple[Function, Counter]:
            stats = Counter(rewritten=0, kept_f32=0)
            if func.name not in chosen:
                return func, stats
            nodes = func.node_map()

            def replace(node: Node, b: Builder, rename: dict[str, str]) -> str | None:
                if node.op != "linear" or nodes.get(node.inputs[1]) is None or nodes[node.inputs[1]].op != "dequantize":
                    return None
                dequantize = nodes[node.inputs[1]]
                scheme_name = dequantize.attr["scheme"]
                try:
                    w4a8_scheme(scheme_name, dequantize.attr["in_features"])
                except OpError:
                    stats["kept_f32"] += 1
                    return None
                if len(dequantize.inputs) != 2 or dequantize.attr.get("dtype", "f32") != "f32":
                    stats["kept_f32"] += 1
                    return None
                x, _, *bias = renamed(node, rename)
                packed, scales = (rename[name] for name in dequantize.inputs)
                stats["rewritten"] += 1
                return b.add("linear_w4a8", x, packed, scales, *bias, scheme=scheme_name)

            return rebuild(func, replace, self.name), stats

        return map_functions(module, rewrite)
