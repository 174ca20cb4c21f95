"""The Triton backend: the one model definition (realm.runtime.transformer) on realm's Triton kernels, weights kept
quantized (realm.kernels.qmatmul on the planes layout). Imports Triton.

    net = TritonModel(load_weights("smollm2"), device="cuda", dtype=torch.float16)   # = Transformer(..., TRITON, ...)
"""

from __future__ import annotations

import torch

from .ops import Backend
from .transformer import Transformer
from .weights import ModelWeights


class TritonModel(Transformer):
    def __init__(self, weights: ModelWeights, device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16):
        super().__init__(weights, Backend.TRITON, device, dtype)
