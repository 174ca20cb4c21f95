"""Input checks that several kernels' launchers share."""

from __future__ import annotations

import torch

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_heads(name: str, t: torch.Tensor, layout: str = "[tokens, heads, head_dim]") -> None:
    """t: a float16/bfloat16/float32 3-D tensor of per-head vectors, stride 1 along head_dim (any other strides:
    views into a fused QKV output are fine). `layout` names the dimensions in the message."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D {layout}, got shape {list(t.shape)}")
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous along head_dim (stride 1), got strides {t.stride()}")
