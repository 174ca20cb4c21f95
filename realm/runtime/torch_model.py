"""The torch backend: the one model definition (realm.runtime.transformer) on the reference ops. Float32 on the CPU is
HF transformers' forward, bit for bit.

    net = TorchModel(load_weights("smollm2"))                 # = Transformer(weights, Backend.TORCH, "cpu")
    logits = net.forward_tokens([[1, 2, 3]])                  # [1, 3, vocab]
"""

from __future__ import annotations

import torch

from .ops import Backend
from .transformer import Transformer
from .weights import ModelWeights


class TorchModel(Transformer):
    def __init__(self, weights: ModelWeights, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(weights, Backend.TORCH, device, dtype)
