"""Weight pruning: masks (unstructured, N:M) and the passes that apply them (``prune-magnitude``,
``prune-wanda``, ``prune-sparsegpt``), each replacing a linear's weight with a pruned f32 copy; and
structured pruning (``prune-structured``: FLaP, Wanda-SP), which removes kv groups and MLP channels
and shrinks the model's shapes."""

from .frame import CalibratedPruning, Pruning
from .levels import Level, PruneRules
from .magnitude import PruneMagnitude
from .masks import keep_mask, nm_mask, unstructured_mask
from .sparsegpt import PruneSparseGPT, sparsegpt
from .spec import PRUNE_METHODS, pruning_pass
from .structured import PruneStructured
from .wanda import PruneWanda, input_norms, wanda_scores

__all__ = ["CalibratedPruning", "Pruning", "Level", "PruneRules", "PruneMagnitude", "keep_mask", "nm_mask",
           "unstructured_mask", "PruneSparseGPT", "sparsegpt", "PRUNE_METHODS", "pruning_pass", "PruneStructured",
           "PruneWanda", "input_norms", "wanda_scores"]
