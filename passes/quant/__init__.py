"""Weight quantization: schemes as data (``ir/quant_schemes.py``) and the passes that apply them (``rtn``)."""

from .awq import QuantizeAWQ
from .gptq import QuantizeGPTQ
from .rtn import QuantizeRTN
from .smoothquant import SmoothQuant
from ...ir.quant_schemes import SCHEMES, QuantizedWeight, Scheme, get_scheme

__all__ = ["QuantizeAWQ", "QuantizeGPTQ", "QuantizeRTN", "SmoothQuant", "SCHEMES", "QuantizedWeight", "Scheme", "get_scheme"]
