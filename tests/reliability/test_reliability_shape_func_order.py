"""The shape functions' stores are sorted by heap slot, unless one store reads another's slot."""

from __future__ import annotations

import tvm
from tvm import tirx as tir

from llmopt.codegen.shape_func_order import sort_shape_func_stores

HEAP = tir.decl_buffer((8,), "int64", "H")


def _slot(index: int):
    return tir.IntImm("int64", index)


def _store(slot: int, value):
    return tir.BufferStore(HEAP, value, [_slot(slot)])


def _slots(func) -> list[int]:
    return [int(store.indices[0]) for store in func.body.seq]


def _module(**bodies) -> tvm.IRModule:
    return tvm.IRModule({name: tir.PrimFunc([], tir.SeqStmt(stores)) for name, stores in bodies.items()})


def test_independent_stores_are_sorted_in_shape_functions_only():
    var = tir.BufferLoad(HEAP, [_slot(0)])
    stores = [_store(3, var * 2), _store(1, var + 1), _store(2, var * 4)]
    out = sort_shape_func_stores(_module(shape_func=stores, other=stores))
    assert _slots(out["shape_func"]) == [1, 2, 3]
    assert _slots(out["other"]) == [3, 1, 2]


def test_dependent_stores_keep_their_order():
    stores = [_store(3, tir.BufferLoad(HEAP, [_slot(1)]) * 2), _store(1, tir.BufferLoad(HEAP, [_slot(0)]) + 1)]
    assert _slots(sort_shape_func_stores(_module(shape_func1=stores))["shape_func1"]) == [3, 1]
