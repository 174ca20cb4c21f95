"""What several kernels' launchers share: input checks, and the host-side integer helpers for grids and tiles."""

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


# triton.cdiv and triton.next_power_of_2 are `constexpr_function`s: from host code each call goes through Triton's
# constexpr unwrapping, and launchers called them several times per launch (a profile of bench/host_overhead.py's
# decode step put them among its largest host costs). Launchers use these plain integer versions.


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def check_window(window: int | None, causal: bool = True) -> None:
    """A sliding window: None (every earlier key) or how many keys each query sees, itself included."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an int >= 1 (keys per query, itself included), got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal attention")


def check_softcap(softcap: float | None) -> None:
    """Soft-capped attention scores (Gemma 2): None, or a finite cap > 0."""
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf"):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
