"""Graph-to-graph passes over the IR, the PassManager that runs them, and its instruments."""

from .base import Pass, PassResult, map_functions
from .cse import CommonSubexpressionElimination
from .dce import DeadCodeElimination
from .fold_constants import FoldConstants
from .fuse_linears import FuseLinears
from .instruments import DumpIR, Instrument, PassVerifyError, Timing, Verify
from .manager import DISABLE_ENV, PASSES, PIPELINES, PassManager, build_pipeline
from .rewrite import DROP, RewriteError, rebuild

__all__ = ["Pass", "PassResult", "map_functions", "CommonSubexpressionElimination", "DeadCodeElimination",
           "FoldConstants", "FuseLinears", "DumpIR", "Instrument", "PassVerifyError", "Timing", "Verify",
           "DISABLE_ENV", "PASSES", "PIPELINES", "PassManager", "build_pipeline", "DROP", "RewriteError",
           "rebuild"]
