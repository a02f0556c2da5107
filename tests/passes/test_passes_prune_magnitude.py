"""prune-magnitude: the smallest |w| of the layer (or of each row) become zero, nothing else changes."""

import numpy as np
import pytest

from llmopt.passes.prune import Level, PruneMagnitude
from prune_data import K, N, WEIGHT


def test_magnitude_zeroes_the_smallest_weights_of_the_layer():
    pruned = PruneMagnitude(sparsity=0.6).prune_weight(WEIGHT, None, Level(sparsity=0.6))
    threshold = np.sort(np.abs(WEIGHT).reshape(-1))[int(0.6 * N * K) - 1]
    np.testing.assert_array_equal(pruned, np.where(np.abs(WEIGHT) > threshold, WEIGHT, 0))


@pytest.mark.parametrize("level", [Level(sparsity=0.5), Level(n=2, m=4)])
def test_row_scope_and_nm_cut_every_row_alike(level):
    pruned = PruneMagnitude(scope="row").prune_weight(WEIGHT, None, level)
    if level.is_nm:
        groups, magnitudes = pruned.reshape(N, -1, 4), np.abs(WEIGHT).reshape(N, -1, 4)
        kept_min = np.where(groups != 0, magnitudes, np.inf).min(axis=-1)
        dropped_max = np.where(groups == 0, magnitudes, -np.inf).max(axis=-1)
        assert ((groups != 0).sum(-1) == 2).all() and (dropped_max <= kept_min).all()
    else:
        for row, original in zip(pruned, WEIGHT):
            threshold = np.sort(np.abs(original))[K // 2 - 1]
            np.testing.assert_array_equal(row, np.where(np.abs(original) > threshold, original, 0))

