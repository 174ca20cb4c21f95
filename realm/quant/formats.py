"""The registry of block formats: `FORMATS[name]` and lookup by name or GGUF type id."""

from __future__ import annotations

from types import MappingProxyType

from .kquants import FORMATS_K
from .legacy import FORMATS_LEGACY
from .nonlinear import FORMATS_NONLINEAR
from .spec import BlockFormat, QuantError

_ORDER = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "MXFP4")
_ALL = {f.name: f for f in FORMATS_LEGACY + FORMATS_K + FORMATS_NONLINEAR}
FORMATS: MappingProxyType[str, BlockFormat] = MappingProxyType({name: _ALL[name] for name in _ORDER})
_BY_TYPE = {f.ggml_type: f for f in FORMATS.values()}


def get_format(fmt: str | BlockFormat) -> BlockFormat:
    """A format by name (case-insensitive, e.g. "q4_k") or the spec itself."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if not isinstance(fmt, str):
        raise QuantError(f"format must be a name or a BlockFormat, got {type(fmt).__name__}")
    spec = FORMATS.get(fmt.upper())
    if spec is None:
        raise QuantError(f"unknown format {fmt!r}; known formats: {', '.join(FORMATS)}")
    return spec


def format_for_ggml_type(ggml_type: int, what: str = "tensor") -> BlockFormat:
    """The format of a GGUF type id; raises naming the type if realm has no codec for it."""
    spec = _BY_TYPE.get(int(ggml_type))
    if spec is None:
        try:
            import gguf

            name = gguf.GGMLQuantizationType(int(ggml_type)).name
        except ValueError:
            name = "unknown"
        known = ", ".join(FORMATS)
        raise QuantError(f"{what}: GGUF type {int(ggml_type)} ({name}) is not supported; realm reads {known}")
    return spec
