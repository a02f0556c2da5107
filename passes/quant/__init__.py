"""Weight quantization: schemes as data (``ir/quant_schemes.py``) and the passes that apply them (``rtn``)."""

from .rtn import QuantizeRTN
from ...ir.quant_schemes import SCHEMES, QuantizedWeight, Scheme, get_scheme

__all__ = ["QuantizeRTN", "SCHEMES", "QuantizedWeight", "Scheme", "get_scheme"]
