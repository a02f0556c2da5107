"""``prune-structured``: structured pruning that shrinks the model: it removes whole kv groups of
attention heads and MLP intermediate channels, ranked by a calibration-based importance, until a
target fraction of the decoder layers' linear weight parameters is gone. The pruned IR has smaller
shapes, so the artifact is smaller and faster (no sparse kernels needed).

Grouped-query attention: the unit removed from attention is a kv group (a kv head with its k and v
rows and the ``G = heads / kv_heads`` query heads that attend with it: their q rows and o_proj
columns), as in FLaP's GQA adaptation. Each layer so keeps ``heads = kv_heads * G`` with the model's
``G``, its KV cache shrinks with it, and the attention op's grouping stays the same. (Removing query
heads inside groups instead would leave the KV cache, usually what decode is bound by, unchanged.)
Layers may end up with different head and channel counts; each keeps at least one kv group and
``structure_plan.min_channels`` channels.

Options:

- ``sparsity``: the fraction of the parameters of the decoder layers' q/k/v/o/gate/up/down weights
  to remove, in [0, 1) (default 0.2); ``--prune flap:0.2`` sets it;
- ``metric``: ``flap`` (fluctuation ``Var(X_j) * ||W[:, j]||^2`` of o_proj / down_proj input channels)
  or ``wanda-sp`` (``sum_i |W_ij| * ||X_j||``), see ``importance``;
- ``allocation``: ``global`` (FLaP: every layer's channel scores standardized per layer and kind, kv
  groups scored by the mean z-score of their columns, all units ranked together with their parameter
  costs; calibration on the dense model) or ``uniform`` (the FLaP paper's Wanda-SP setting: every layer
  removes ``floor(sparsity * kv_heads)`` kv groups and the MLPs the same share of channels; each
  block is scored on the outputs of the already-pruned blocks before it); ``auto``: global for flap,
  uniform for wanda-sp;
- ``compensate``: ``yes`` adds FLaP's bias compensation to o_proj / down_proj (``W[:, removed] @
  mean(X[removed])``), ``no`` does not; ``auto``: yes for flap, no for wanda-sp;
- ``channel_multiple``: MLP channels are removed in chunks of this many (lowest scores first), so
  layers keep multiples of it (the CPU kernels work in blocks of 64 outputs; default 32, the fused
  gate+up then has a multiple of 64 rows);
- ``rules``: ``pattern=skip`` keeps the attention (pattern matching its o_proj) or MLP (its
  down_proj) of matching layers whole; other levels are refused;
- ``calibration``, ``samples``, ``seq_len``, ``seed``: the calibration set (as every calibrated pass).

Requires: verified IR whose ``prefill(ids, pos)`` takes no other input, with f32 weights, attention
and MLP blocks as ``frontend/decoder.py`` emits them (``blocks``), before ``fuse-linears`` and any
quantization. Guarantees: the blocks lose the chosen kv groups and channels in every function
(``shrink``): smaller derived weights ``<weight>.pruned-structured``, head reshapes and decode's KV
cache params with the new counts, re-inferred types, verified IR; ``meta.kv_cache.layer_kv_heads``
and ``meta.decoder.layers`` record the per-layer shapes. A zero fraction leaves the module unchanged.
The removed parameters are the closest the units allow to the target (``structure_plan``). The
original weights stay in the store until ``dce``. Stats: ``params`` (decoder linear weights before),
``params_removed``, ``removed_fraction``, ``kv_groups_removed``, ``channels_removed``,
``layers_changed``, and the calibration memory (``calibration_peak_mib``, ``calibration_rss_mib``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ...errors import LLMOptError
from ...ir.graph import Module, Node
from ..base import PassResult
from ..quant.calibrated import memory_stats
from ..quant.calibration import stream_linears
from .blocks import AttentionBlock, MlpBlock, find_blocks
from .frame import CalibratedPruning
from .importance import METRICS, InputStats, channel_scores, group_sums, structure_scores
from .shrink import kept_head_rows, shrink_module
from .structure_plan import Removal, block_params, global_removal, lowest, uniform_counts

ALLOCATIONS = ("auto", "global", "uniform")
COMPENSATE = ("auto", "yes", "no")


@dataclass(frozen=True)
class PruneStructured(CalibratedPruning):
    """Remove kv groups and MLP channels by calibrated importance, shrinking the model."""

    name = "prune-structured"
    before_fusion: ClassVar[bool] = True  # the build places it before fuse-linears (see compiler.py)
    sparsity: float = 0.2
    metric: str = "flap"
    allocation: str = "auto"
    compensate: str = "auto"
    channel_multiple: int = 32

    def __post_init__(self):
        super().__post_init__()
        checks = (("metric", self.metric, METRICS), ("allocation", self.allocation, ALLOCATIONS),
                  ("compensate", self.compensate, COMPENSATE))
        for option, value, known in checks:
            if value not in known:
                raise LLMOptError(f"prune-structured: {option}={value!r} is not one of {', '.join(known)}.",
                                  f"Use {option}={known[0]}.")
        if self.nm.strip():
            raise LLMOptError(f"prune-structured: nm={self.nm!r}: structured pruning removes whole heads and "
                              "channels, not N of every M weights.", "Give a fraction, e.g. --prune flap:0.2.")
        if self.channel_multiple < 1:
            raise LLMOptError(f"prune-structured: channel_multiple={self.channel_multiple} must be >= 1.",
                              "Use e.g. channel_multiple=32 (or 1 for single channels).")
        if any(level is not None for _, level in self.layer_rules().parsed()):
            raise LLMOptError(f"prune-structured: rules {self.rules!r} give a level; structured pruning takes "
                              "one global fraction.", "Use only pattern=skip rules, e.g. 'layers.0.=skip'.")

    @property
    def global_ranking(self) -> bool:
        return self.allocation == "global" or (self.allocation == "auto" and self.metric == "flap")

    @property
    def compensating(self) -> bool:
        return self.compensate == "yes" or (self.compensate == "auto" and self.metric == "flap")

    def apply_with_tokens(self, module: Module, tokens: np.ndarray) -> PassResult:
        attention, mlp = self.blocks(module)
        rules = self.layer_rules()
        whole = {b.key for b in [*attention, *mlp] if rules.level_for(b.projections()[-1].source, b.key) is None}
        prunable_attention = [b for b in attention if b.key not in whole]
        prunable_mlp = [b for b in mlp if b.key not in whole]
        total = sum(block_params(b) for b in [*attention, *mlp])
        target = self.sparsity * total
        by_key = {b.key: b for b in [*prunable_attention, *prunable_mlp]}
        stats: dict[str, InputStats] = {}
        removal = Removal()
        sequential = not self.global_ranking
        if sequential:
            groups, channels = uniform_counts(prunable_attention, prunable_mlp, self.sparsity, target,
                                              self.channel_multiple)

        def visit(linear: Node, weight: Node, inputs: list[np.ndarray]) -> np.ndarray | None:
            block = by_key.get(weight.attr["name"])
            if block is None or block.key in stats:
                return None
            stats[block.key] = InputStats.of(inputs, weight.type.shape[1])
            if not sequential:
                return None
            w = module.weights.get(block.key)
            columns = channel_scores(self.metric, w, stats[block.key])
            if isinstance(block, AttentionBlock):
                removal.groups[block.key] = lowest(group_sums(columns, block.kv_heads), groups[block.key])
                kept_columns = kept_head_rows(block, removal.groups[block.key])[0]
            else:
                removal.channels[block.key] = lowest(columns, channels[block.key])
                kept_columns = np.setdiff1d(np.arange(block.intermediate), removal.channels[block.key])
            pruned = np.zeros_like(w)  # removing inputs = zero columns, for the blocks after this one
            pruned[:, kept_columns] = w[:, kept_columns]
            return pruned

        memory = stream_linears(module, tokens, visit)
        missing = sorted(set(by_key) - set(stats))
        if missing:
            raise LLMOptError(f"prune-structured: calibration never reached {', '.join(missing[:3])}.",
                              "Structured pruning needs every pruned block in @prefill.")
        if not sequential:
            removal = self.global_plan(module, prunable_attention, prunable_mlp, stats, target)
        means = {key: s.mean for key, s in stats.items()} if self.compensating else None
        pruned = shrink_module(module, attention, mlp, removal, means, self.name)
        removed = removal.params(attention, mlp)
        return PassResult(pruned, {
            "params": total, "params_removed": removed, "removed_fraction": round(removed / total, 6),
            "kv_groups_removed": sum(map(len, removal.groups.values())),
            "channels_removed": sum(map(len, removal.channels.values())),
            "layers_changed": len({key for key, members in [*removal.groups.items(), *removal.channels.items()]
                                   if members}), **memory_stats(memory)})

    def blocks(self, module: Module) -> tuple[list[AttentionBlock], list[MlpBlock]]:
        prefill = module.functions.get("prefill")
        attention, mlp = find_blocks(prefill) if prefill is not None else ([], [])
        if not attention and not mlp:
            fused = prefill is not None and any(n.op == "slice" for n in prefill.nodes)
            raise LLMOptError("prune-structured: found no attention or MLP block to prune in @prefill"
                              + (" (are q/k/v already fused?)." if fused else "."),
                              "Run prune-structured on a decoder from llmopt's frontends, before fuse-linears.")
        return attention, mlp

    def global_plan(self, module: Module, attention: list[AttentionBlock], mlp: list[MlpBlock],
                    stats: dict[str, InputStats], target: float) -> Removal:
        """FLaP's global ranking of standardized scores (see the module docstring)."""
        def scores(block, kind):
            columns = channel_scores(self.metric, module.weights.get(block.key), stats[block.key])
            return structure_scores(self.metric, kind, columns, global_ranking=True)

        heads = {b.key: (b, scores(b, "attention").reshape(b.kv_heads, -1).mean(axis=1)) for b in attention}
        channels = {b.key: (b, scores(b, "mlp")) for b in mlp}
        return global_removal(heads, channels, target, self.channel_multiple)
