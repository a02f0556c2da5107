"""llmopt's IR: typed SSA graphs over external weights, with a printer, parser, verifier and interpreter."""

from .graph import Builder, Function, Module, Node, Param
from .interp import cache_buffers, run, run_module
from .ops import OPS, OpError, infer_type
from .parser import IRParseError, parse_module
from .printer import print_module
from .types import TensorType, parse_type
from .verify import VerifyError, verify_module
from .weights import WeightStore

__all__ = ["Builder", "Function", "Module", "Node", "Param", "cache_buffers", "run", "run_module", "OPS", "OpError",
           "infer_type", "IRParseError", "parse_module", "print_module", "TensorType", "parse_type",
           "VerifyError", "verify_module", "WeightStore"]
