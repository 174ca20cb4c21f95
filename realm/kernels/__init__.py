"""realm.kernels: Triton kernels, each next to its torch reference.

    qmatmul(x, w)          # x [..., K] @ w.T for a QTensor w [N, K] of any realm.quant format
    qmatmul_ref(x, w)      # the reference: dequantize, matmul in float32
    dequantize(w)          # the kernels' in-register decode, materialised (bit-exact with realm.quant)
    plan_qmatmul(m, w)     # which kernel and tiles qmatmul runs; autotune(x, w) measures and records the best
"""

from . import tuning
from .dequantize import dequantize, dequantize_ref
from .qmatmul import (
    DecodeConfig,
    Plan,
    PrefillConfig,
    Regime,
    autotune,
    candidate_configs,
    plan_qmatmul,
    qmatmul,
    qmatmul_ref,
)

__all__ = [
    "DecodeConfig",
    "Plan",
    "PrefillConfig",
    "Regime",
    "autotune",
    "candidate_configs",
    "dequantize",
    "dequantize_ref",
    "plan_qmatmul",
    "qmatmul",
    "qmatmul_ref",
    "tuning",
]
