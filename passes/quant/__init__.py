"""Weight quantization: schemes as data (``schemes``) and the passes that apply them (``rtn``)."""

from .rtn import QuantizeRTN
from .schemes import SCHEMES, QuantizedWeight, Scheme, get_scheme

__all__ = ["QuantizeRTN", "SCHEMES", "QuantizedWeight", "Scheme", "get_scheme"]
