"""ctypes access to llama.cpp's own quantizers (ggml, from the optional llama-cpp-python package).

Tests use it as an independent reference: `quantize` runs `ggml_quantize_chunk` (what llama-quantize runs, without an
importance matrix); `quantize_row_ref` runs a type's `from_float_ref` (the only quantizer of the activation formats
Q8_1 and Q8_K); `dequantize` runs a type's `to_float`. `load()` returns None when llama-cpp-python is not installed.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_ROW_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class Ggml:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def traits(self, ggml_type: int) -> _TypeTraits:
        return self.lib.ggml_get_type_traits(ggml_type).contents

    def quantize(self, x: np.ndarray, ggml_type: int) -> np.ndarray:
        """float32 [rows, k] -> uint8 [rows, row_bytes] via ggml_quantize_chunk."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, k = x.shape
        t = self.traits(ggml_type)
        out = np.zeros((rows, k // t.blck_size * t.type_size), dtype=np.uint8)
        self.lib.ggml_quantize_init(ggml_type)
        self.lib.ggml_quantize_chunk(ggml_type, x.ctypes.data, out.ctypes.data, 0, rows, k, None)
        return out

    def quantize_row_ref(self, x: np.ndarray, ggml_type: int) -> np.ndarray:
        """float32 [rows, k] -> uint8 [rows, row_bytes] via the type's from_float_ref, or the exported
        `quantize_row_<type>_ref` where the traits table has none (Q8_K)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, k = x.shape
        t = self.traits(ggml_type)
        out = np.zeros((rows, k // t.blck_size * t.type_size), dtype=np.uint8)
        _ROW_FN(t.from_float_ref or self._symbol(f"quantize_row_{t.type_name.decode()}_ref"))(
            x.ctypes.data, out.ctypes.data, x.size
        )
        return out

    def _symbol(self, name: str) -> int | None:
        fn = getattr(self.lib, name, None)
        return ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None

    def dequantize(self, data: np.ndarray, ggml_type: int, n: int) -> np.ndarray | None:
        """uint8 blocks -> float32 [n] via the type's to_float, else an exported `dequantize_row_<type>` (Q8_K has
        one but no to_float); None where ggml has neither."""
        t = self.traits(ggml_type)
        fn = t.to_float or self._symbol(f"dequantize_row_{t.type_name.decode()}")
        if not fn:
            return None
        data = np.ascontiguousarray(data, dtype=np.uint8)
        out = np.empty(n, dtype=np.float32)
        _ROW_FN(fn)(data.ctypes.data, out.ctypes.data, n)
        return out


@functools.cache
def load() -> Ggml | None:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    lib_dir = Path(spec.origin).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.so*")) + sorted(lib_dir.glob("libggml-base.dylib"))
    if not candidates:
        return None
    return Ggml(ctypes.CDLL(str(candidates[0])))
