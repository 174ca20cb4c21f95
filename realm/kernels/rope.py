"""Rotary position embedding (Su et al. 2021, RoFormer), rotate-half ("neox") layout, in place on q and k.

For each head of token t at position p = positions[t], dimension pairs (i, i + D/2) rotate by the angle
p * theta^(-2i/D):

    x[i]       <- x[i] * cos - x[i + D/2] * sin
    x[i + D/2] <- x[i + D/2] * cos + x[i] * sin

This is HF's `apply_rotary_pos_emb` (realm.runtime.torch_model.apply_rope); realm's loader un-permutes llama's Q/K
rows, so every llama-family model uses this layout. Each token carries its own position (ragged batches, decode at
any offset). One program per token rotates all its q and k heads, reading cos/sin once.

The table (`rope_cache`) is float32 [max_positions, 2, D/2]: row p holds cos then sin of p's D/2 angles, so one
token's values are one contiguous 4*D-byte read; its values are exactly torch_model.rope_tables'. The arithmetic is
float32 with one rounding to q's dtype at the store, compiled without multiply-add fusion so that float32 results
equal the torch reference's bit for bit.

Positions out of [0, max_positions): on CPU the launcher raises. On CUDA it does not look (that needs a device to
host sync per call, and the runtime knows its positions on the host); the kernel reads no table row out of bounds and
writes NaN to such a token's q and k instead, so the error shows, and under TRITON_DEBUG=1 it asserts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_heads, next_power_of_2
from .qdecode import check_runnable

POSITION_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _rotate_heads(ptr, n_heads, stride_h, half, cos, sin, d, d_mask, BLOCK_H: tl.constexpr):
    """Rotates heads 0 .. n_heads of one token (ptr: its first element) by cos, sin [1, BLOCK_D]."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < n_heads)[:, None] & d_mask[None, :]
    first = ptr + heads[:, None] * stride_h + d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + half, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, pos_ptr, cos_sin_ptr, n_q_heads, n_k_heads, half, max_positions,
                 stride_qt, stride_qh, stride_kt, stride_kh,
                 BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token `program_id`: all its q heads, then all its k heads."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    valid = (pos >= 0) & (pos < max_positions)
    tl.device_assert(valid, "rope: position outside the cos/sin table")
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    row = cos_sin_ptr + tl.where(valid, pos, 0) * (2 * half)  # an invalid position reads row 0, then NaNs it
    cos = tl.where(valid, tl.load(row + d, mask=d_mask, other=0.0), float("nan"))[None, :]
    sin = tl.where(valid, tl.load(row + half + d, mask=d_mask, other=0.0), float("nan"))[None, :]
    _rotate_heads(q_ptr + t * stride_qt, n_q_heads, stride_qh, half, cos, sin, d, d_mask, BLOCK_QH)
    _rotate_heads(k_ptr + t * stride_kt, n_k_heads, stride_kh, half, cos, sin, d, d_mask, BLOCK_KH)


def rope_cache(head_dim: int, max_positions: int, theta: float, device: torch.device | str = "cpu",
               inv_freq: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """float32 [max_positions, 2, head_dim // 2]: [p, 0] = cos, [p, 1] = sin of p * inv_freq, computed on the CPU
    exactly as HF's rotary embedding (tests/hf_formulas.rope_tables, whose two halves both repeat these values).

    inv_freq: float32 [head_dim // 2], the frequencies of a scaled rope (realm.runtime.config.RopeScaling); None: the
    plain theta^(-2i/D). scale: multiplies cos and sin (YaRN's attention factor; HF scales its tables the same way)."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    elif inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32 [{head_dim // 2}], got {inv_freq.dtype} {list(inv_freq.shape)}")
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq.cpu()[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.stack((cos, sin), dim=1).to(device)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    check_heads("q", q)
    check_heads("k", k)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    tokens, _, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim:
        raise ValueError(f"q {list(q.shape)} and k {list(k.shape)} must agree on tokens and head_dim")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be even and >= 2, got {head_dim}")
    if positions.dtype not in POSITION_DTYPES:
        raise ValueError(f"positions must be int32 or int64, got {positions.dtype}")
    if positions.shape != (tokens,):
        raise ValueError(f"positions must be [{tokens}] (one per token of q), got {list(positions.shape)}")
    if cos_sin.dtype != torch.float32 or cos_sin.dim() != 3 or cos_sin.shape[1:] != (2, head_dim // 2):
        raise ValueError(f"cos_sin must be float32 [max_positions, 2, {head_dim // 2}] (rope_cache), got "
                         f"{cos_sin.dtype} {list(cos_sin.shape)}")
    if not cos_sin.is_contiguous():
        raise ValueError("cos_sin must be contiguous")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [tokens, n_heads, head_dim] and k [tokens, n_kv_heads, head_dim] in place and returns them.

    q, k: float16/bfloat16/float32, one dtype, stride 1 along head_dim and any token and head strides (views into a
    fused qkv output work as they are). positions: int32/int64 [tokens], each in [0, max_positions).
    cos_sin: `rope_cache(head_dim, max_positions, theta, device)`.
    """
    _check_inputs(q, k, positions, cos_sin)
    check_runnable([q, k, positions, cos_sin], "apply_rope")
    tokens, max_positions = q.shape[0], cos_sin.shape[0]
    if positions.device.type == "cpu" and tokens:
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= max_positions:
            raise ValueError(f"positions must be in [0, {max_positions}) (the cos_sin table), got {lo} .. {hi}")
    if tokens:
        _launch(q, k, positions, cos_sin)
    return q, k


def apply_rope_unchecked(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rope without the input checks (nor the CPU check of the positions), for a caller that has checked these
    shapes and positions already (the model: its first layer's call)."""
    if q.shape[0]:
        _launch(q, k, positions, cos_sin)
    return q, k


def _launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """The kernel on validated inputs, positions unchecked (tests use it to see out-of-range positions give NaN)."""
    (tokens, n_heads, head_dim), n_kv_heads = q.shape, k.shape[1]
    half = head_dim // 2
    # Without fusion the float32 result rounds as torch's separate multiplies and add: bit-equal to the reference.
    _rope_kernel[(tokens,)](q, k, positions, cos_sin, n_heads, n_kv_heads, half, cos_sin.shape[0],
                            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                            BLOCK_QH=next_power_of_2(n_heads), BLOCK_KH=next_power_of_2(n_kv_heads),
                            BLOCK_D=next_power_of_2(half), enable_fp_fusion=False)


def apply_rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """New rotated q, k: torch_model.apply_rope's formula in float32 with each token's own row of the table,
    rounded once to q's dtype."""
    cos, sin = cos_sin[positions.long()].unbind(1)  # [tokens, head_dim // 2] each
    cos, sin = torch.cat((cos, cos), -1)[:, None, :], torch.cat((sin, sin), -1)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        half = x.shape[-1] // 2
        return (xf * cos + torch.cat((-xf[..., half:], xf[..., :half]), -1) * sin).to(x.dtype)

    return rotate(q), rotate(k)
