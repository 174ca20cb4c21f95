"""HF transformers' llama formulas, written out as the tests' oracle (transformers' modeling_llama.py): what realm's
reference ops must equal bit for bit in float32 for the torch backend to reproduce HF's logits, and what the kernels
are compared with."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalize in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_tables(config, positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """LlamaRotaryEmbedding's cos, sin: float32 [positions, head_dim], the frequencies repeated for both halves."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb on one of q, k: x [..., head_dim]; cos, sin broadcast to it."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)
