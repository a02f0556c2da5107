"""The ``densify`` op (ir/sparse_format.py) as TE: target-independent, for generic lowering and for
kernels that densify a block of rows before a dense product."""

from __future__ import annotations

from typing import Callable

from tvm import te, tirx

from ...ir.sparse_format import NMFormat


def densified_value(fmt: NMFormat, values, indices) -> Callable:
    """``value(row, column)``: the dense weight at ``[row, column]``, the sum over the ``n`` slots of
    the column's group of the values whose index is the column's position in the group."""
    mask = tirx.const(2 ** fmt.bits - 1, "uint32")

    def value(row, column):
        group, position = tirx.floordiv(column, fmt.m), tirx.floormod(column, fmt.m)
        total = tirx.const(0, "float32")
        for slot in range(fmt.n):
            c = group * fmt.n + slot
            word = indices[row, tirx.floordiv(c, fmt.per_word)]
            shift = tirx.Cast("uint32", tirx.floormod(c, fmt.per_word) * fmt.bits)
            index = tirx.bitwise_and(tirx.shift_right(word, shift), mask)
            total = total + tirx.Select(index == tirx.Cast("uint32", position), values[row, c],
                                        tirx.const(0, "float32"))
        return total

    return value


def densify_te(values: te.Tensor, indices: te.Tensor, *, fmt: NMFormat, in_features: int) -> te.Tensor:
    """f32 ``[N, in_features]``: the ``densify`` op, materialized."""
    return te.compute((values.shape[0], in_features), densified_value(fmt, values, indices), name="densify")
