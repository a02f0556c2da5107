"""A fallback CPU schedule for the PrimFuncs no kernel of ours covers (norms, rope, activations).

TVM legalizes them into plain loop nests that run on one core, element by element. This rule,
applied after fusion, inlines what it can, then for every block: the innermost loop, when its
extent is a known multiple of the target's f32 lanes (``cpu_isa``: 16 on x86, 4 on aarch64), is
split and vectorized; the leading spatial loops are fused and run in parallel when there is enough
of them to pay for waking the thread pool (prefill's sequence axis; decode's ``[1, 1, hidden]`` ops
stay serial).
"""

from __future__ import annotations

import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline

from .cpu_isa import vector_unit

MIN_PARALLEL = 4  # fused outer iterations below which a parallel loop costs more than it saves


def _static_extent(sch: s_tir.Schedule, loop) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


class CPUFallback(ScheduleRule):
    """Parallelize the outer spatial loops and vectorize the inner loop of every block, by ``lanes``
    (default: the f32 lanes of the target's vector registers)."""

    def __init__(self, lanes: int | None = None):
        self.lanes = lanes

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        lanes = self.lanes or vector_unit(target).fallback_lanes
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in try_inline(sch, infos):
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            if not loops or len(loops) != len(kinds):
                continue
            leading = len(kinds) - len(kinds.lstrip("S"))
            inner = _static_extent(sch, loops[-1])
            if info.is_injective() and inner is not None and inner % lanes == 0 and len(loops) > 1:
                _, vector = sch.split(loops[-1], factors=[None, lanes])
                sch.vectorize(vector)
                leading -= 1  # the last spatial loop is now the vector loop
            outer = loops[:leading]
            extents = [_static_extent(sch, loop) for loop in outer]
            if outer and (None in extents or math.prod(extents) >= MIN_PARALLEL):
                sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch

