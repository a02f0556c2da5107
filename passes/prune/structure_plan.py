"""Which kv groups and MLP channels structured pruning removes, to remove a target number of
parameters: a global ranking over every layer (FLaP) or the same share in every layer (uniform).

Units of removal, each with a cost in parameters (weights of the projections it removes rows or
columns of):

- a kv group of an attention block: its k and v rows, its ``G`` query heads' q rows and o_proj
  columns: ``G*D*(q_in + o_out) + D*(k_in + v_in)``;
- a chunk of MLP channels: ``channel_multiple`` channels (the first chunk ``I % multiple`` of them
  when that is not 0), each the rows of gate and up and the column of down: ``gate_in + up_in +
  down_out`` per channel. Chunks are cut from the channels in ascending score order, so a layer
  always removes its lowest-scored channels and keeps a multiple of ``channel_multiple`` (or all).

Every block keeps at least one kv group and ``min_channels(I)`` channels.

``global_removal``: units of all layers sorted by score (ties by block order, then index), removed
lowest first while the removed parameters are below the target; a unit that would overshoot is
taken only if that lands closer to the target than stopping, else later (smaller) units are tried.
Scores must be comparable across layers (standardized, see ``importance``).

``uniform_counts``: every attention block removes ``floor(fraction * kv_heads)`` groups (at most all
but one); the MLP blocks then all remove the same share of their channels, chosen so the total
comes closest to the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .blocks import AttentionBlock, MlpBlock

MIN_CHANNEL_FRACTION = 1 / 16


def min_channels(intermediate: int) -> int:
    """Channels every MLP block keeps at least."""
    return max(1, math.ceil(intermediate * MIN_CHANNEL_FRACTION))


def group_cost(block: AttentionBlock) -> int:
    g, d = block.group, block.head_dim
    return g * d * (block.q.in_features + block.o.out_features) + d * (block.k.in_features + block.v.in_features)


def channel_cost(block: MlpBlock) -> int:
    return block.gate.in_features + block.up.in_features + block.down.out_features


def block_params(block: AttentionBlock | MlpBlock) -> int:
    return sum(p.out_features * p.in_features for p in block.projections())


def chunk_sizes(intermediate: int, multiple: int) -> list[int]:
    """Sizes of the chunks channels are removed in, lowest scores first."""
    first = intermediate % multiple or multiple
    if first >= intermediate:
        return [intermediate]
    return [first] + [multiple] * ((intermediate - first) // multiple)


def chunks(scores: np.ndarray, multiple: int) -> list[np.ndarray]:
    """Channel indices in ascending score order (ties: lower index first), cut into chunks."""
    order = np.lexsort((np.arange(len(scores)), scores))
    bounds = np.cumsum([0] + chunk_sizes(len(scores), multiple))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def removable_count(intermediate: int, multiple: int, want: float) -> int:
    """The channel count closest to ``want`` a block can remove: a sum of leading chunk sizes that
    leaves at least ``min_channels``."""
    counts = np.cumsum([0] + chunk_sizes(intermediate, multiple))
    counts = counts[intermediate - counts >= min_channels(intermediate)]
    return int(counts[np.argmin(np.abs(counts - want))])


@dataclass
class Removal:
    """Removed kv groups by attention block key, removed channels by MLP block key (sorted)."""

    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    channels: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def params(self, attention: list[AttentionBlock], mlp: list[MlpBlock]) -> int:
        """Parameters the removal takes out of ``attention`` and ``mlp``."""
        return (sum(group_cost(b) * len(self.groups.get(b.key, ())) for b in attention)
                + sum(channel_cost(b) * len(self.channels.get(b.key, ())) for b in mlp))


@dataclass(frozen=True)
class _Unit:
    score: float
    order: int  # block order, for ties
    index: int  # group index or chunk number
    block: str
    kind: str  # "group" | "chunk"
    members: tuple[int, ...]
    cost: int


def global_removal(attention: dict[str, tuple[AttentionBlock, np.ndarray]],
                   mlp: dict[str, tuple[MlpBlock, np.ndarray]], target: float, multiple: int) -> Removal:
    """``attention``: key -> (block, score per kv group); ``mlp``: key -> (block, score per channel);
    scores comparable across blocks. See the module docstring."""
    units = []
    for order, (key, (block, scores)) in enumerate(attention.items()):
        units += [_Unit(float(s), order, g, key, "group", (g,), group_cost(block)) for g, s in enumerate(scores)]
    for order, (key, (block, scores)) in enumerate(mlp.items(), start=len(attention)):
        units += [_Unit(float(scores[c].mean()), order, i, key, "chunk", tuple(int(j) for j in c),
                        channel_cost(block) * len(c)) for i, c in enumerate(chunks(scores, multiple))]
    units.sort(key=lambda u: (u.score, u.order, u.index))
    removal, removed = Removal(), 0
    groups_left = {key: len(scores) for key, (_, scores) in attention.items()}
    channels_left = {key: len(scores) for key, (_, scores) in mlp.items()}
    next_chunk = dict.fromkeys(mlp, 0)
    taken: dict[str, list[int]] = {}
    for unit in units:
        if removed >= target:
            break
        if unit.kind == "group" and groups_left[unit.block] <= 1:
            continue
        if unit.kind == "chunk" and (next_chunk[unit.block] != unit.index or channels_left[unit.block]
                                     - len(unit.members) < min_channels(mlp[unit.block][0].intermediate)):
            continue
        if removed + unit.cost - target > target - removed:
            continue  # overshoots more than stopping here misses: try smaller units
        removed += unit.cost
        taken.setdefault(unit.block, []).extend(unit.members)
        if unit.kind == "group":
            groups_left[unit.block] -= 1
        else:
            next_chunk[unit.block] += 1
            channels_left[unit.block] -= len(unit.members)
    for key, members in taken.items():
        (removal.groups if key in attention else removal.channels)[key] = tuple(sorted(members))
    return removal


def uniform_counts(attention: list[AttentionBlock], mlp: list[MlpBlock], fraction: float, target: float,
                   multiple: int) -> tuple[dict[str, int], dict[str, int]]:
    """Groups to remove per attention block and channels per MLP block (see the module docstring)."""
    groups = {b.key: min(int(math.floor(fraction * b.kv_heads + 1e-9)), b.kv_heads - 1) for b in attention}
    left = target - sum(group_cost(b) * groups[b.key] for b in attention)
    mlp_params = sum(channel_cost(b) * b.intermediate for b in mlp)
    share = min(max(left / mlp_params, 0.0), 1.0) if mlp_params else 0.0
    channels = {b.key: removable_count(b.intermediate, multiple, share * b.intermediate) for b in mlp}
    return groups, channels


def lowest(scores: np.ndarray, count: int) -> tuple[int, ...]:
    """The ``count`` lowest-scored indices (ties: lower index first), sorted."""
    order = np.lexsort((np.arange(len(scores)), scores))
    return tuple(sorted(int(i) for i in order[:count]))
