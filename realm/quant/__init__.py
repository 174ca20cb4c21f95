"""GGUF block formats: specs, reference quantizers and dequantizers, and the QTensor weight container.

    FORMATS["Q4_K"]                      # spec: block size, bytes per block, field layout, GGUF type id
    dequantize(data, "Q4_K", (N, K))     # uint8 GGUF blocks -> float32
    quantize(w, "Q4_K")                  # float -> uint8 GGUF blocks (llama.cpp's reference algorithms)
    QTensor.from_float(w, "Q4_K")        # a weight for the kernels
"""

from .api import dequantize, quantize
from .formats import FORMATS, format_for_ggml_type, get_format
from .qtensor import Layout, QTensor
from .spec import BlockFormat, Field, QuantError

__all__ = [
    "FORMATS",
    "BlockFormat",
    "Field",
    "Layout",
    "QTensor",
    "QuantError",
    "dequantize",
    "format_for_ggml_type",
    "get_format",
    "quantize",
]
