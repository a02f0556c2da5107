"""Shared set-up of the debugging tests: a tiny Llama's IR, and a deliberately wrong pass."""

from __future__ import annotations

from dataclasses import dataclass

from llmopt.ir.graph import Builder, Module, Node
from llmopt.passes import Pass, PassResult, map_functions, rebuild


@dataclass(frozen=True)
class SwapGateUp(Pass):
    """A WRONG pass (for the tests): after fuse-linears, the MLP's gate and up slices trade places,
    so the block computes silu(up) * gate. Types stay valid; only the numbers change."""

    name = "swap-gate-up"

    def apply(self, module: Module) -> PassResult:
        return map_functions(module, self.rewrite_function)

    def rewrite_function(self, func):
        swapped = {"gate_proj": "up_proj", "up_proj": "gate_proj"}
        by_source = {n.source: n for n in func.nodes if n.op == "slice"}
        count = 0

        def replace(node: Node, b: Builder, rename: dict[str, str]):
            nonlocal count
            prefix, _, role = node.source.rpartition(".")
            twin = by_source.get(f"{prefix}.{swapped.get(role)}")
            if node.op != "slice" or twin is None:
                return None
            count += 1
            return b.add("slice", rename[node.inputs[0]], **twin.attr)

        return rebuild(func, replace, self.name), {"swapped": count}
