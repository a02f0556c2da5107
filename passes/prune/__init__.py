"""Weight pruning: masks (unstructured, N:M) and the passes that apply them (``prune-magnitude``,
``prune-wanda``, ``prune-sparsegpt``), each replacing a linear's weight with a pruned f32 copy."""

from .frame import CalibratedPruning, Pruning
from .levels import Level, PruneRules
from .magnitude import PruneMagnitude
from .masks import keep_mask, nm_mask, unstructured_mask
from .sparsegpt import PruneSparseGPT, sparsegpt
from .spec import PRUNE_METHODS, pruning_pass
from .wanda import PruneWanda, input_norms, wanda_scores

__all__ = ["CalibratedPruning", "Pruning", "Level", "PruneRules", "PruneMagnitude", "keep_mask", "nm_mask",
           "unstructured_mask", "PruneSparseGPT", "sparsegpt", "PRUNE_METHODS", "pruning_pass", "PruneWanda",
           "input_norms", "wanda_scores"]
