"""Put the stores of the VM's shape functions in a fixed order, so that builds are reproducible.

TVM's ``VMShapeLower`` writes each ``shape_func`` as a sequence of ``H[slot] = expr`` stores into
the shape heap, in an order that follows heap addresses of its own bookkeeping and so changes from
one compilation to the next. The stores are independent (each reads only heap slots of symbolic
variables, which the shape function never writes), so sorting them by slot changes nothing but the
order; this pass does that after ``VMShapeLower``.
"""

from __future__ import annotations

import re

import tvm
from tvm import tirx as tir


def _sorted_stores(body: tir.Stmt) -> tir.Stmt | None:
    """``body`` with its stores sorted by heap slot, or None if it is not a shape function's body."""
    stores = list(body.seq) if isinstance(body, tir.SeqStmt) else [body]
    if len(stores) < 2:  # nothing to order
        return None
    if not all(isinstance(s, tir.BufferStore) and len(s.indices) == 1
                             and isinstance(s.indices[0], tir.IntImm) for s in stores):
        return None
    heap = stores[0].buffer
    if any(not s.buffer.same_as(heap) for s in stores):
        return None
    written = {int(s.indices[0]) for s in stores}
    loads = re.compile(rf"\b{re.escape(heap.name)}\[([^\]]*)\]")  # H[T.int64(3)] in TVMScript
    read = [re.fullmatch(r"T\.int\d+\((\d+)\)", index) for s in stores for index in loads.findall(str(s.value))]
    if not all(read) or written & {int(m.group(1)) for m in read}:  # a store may depend on another: keep
        return None
    return tir.SeqStmt(sorted(stores, key=lambda s: int(s.indices[0])))


@tvm.transform.module_pass(opt_level=0, name="llmopt.SortShapeFuncStores")
def sort_shape_func_stores(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """The module with every shape function's stores in heap-slot order."""
    updates = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tir.PrimFunc) and gvar.name_hint.startswith("shape_func"):
            body = _sorted_stores(func.body)
            if body is not None:
                updates[gvar] = func.with_body(body)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod
