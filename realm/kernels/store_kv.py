"""Writes the K and V of new tokens into their slots of a paged KV cache (realm.kernels.paged's layout).

    k_cache.view(-1, kv_heads, head_dim)[slot_mapping[t]] = k[t]      (and v into v_cache), for every token t

slot = block * block_size + row: the runtime's block manager picks it when it gives a sequence its next position
(vLLM's `reshape_and_cache`, Kwon et al. 2023). k and v come straight from the fused qkv projection, so any token and
head strides are read as they are. One program copies all heads of one token's K and V (a block of heads per program
when a token is wider than one tile). It is a copy: bit-exact with `store_kv_ref`.

Slots out of [0, num_blocks * block_size): on CPU the launcher raises. On CUDA it does not look (a device-to-host sync
per layer and step; the runtime builds slot mappings on the host and checks them there): the kernel writes nothing
for such a token, and under TRITON_DEBUG=1 it asserts. Two tokens with one slot leave either token's values there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import cdiv, check_heads, next_power_of_2
from .paged import check_index, check_kv_cache
from .qdecode import check_runnable

MAX_TILE = 4096  # elements one program copies per tensor: 32 heads of 128 (Llama-3-70B's 8 KV heads take one tile)


@triton.jit
def _store_kv_kernel(k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slot_ptr, n_slots, n_kv_heads, head_dim,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, stride_ch,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token `program_id(0)`, heads program_id(1) * BLOCK_H ..: k[t] and v[t] into slot slot_mapping[t]."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    # The slot broadcast over the heads: the interpreter rejects masks mixing a scalar and a tile.
    slot = tl.load(slot_ptr + t + tl.zeros([BLOCK_H], dtype=tl.int64)).to(tl.int64)
    valid = (slot >= 0) & (slot < n_slots)
    tl.device_assert(valid, "store_kv: slot outside the KV cache")
    mask = ((heads < n_kv_heads) & valid)[:, None] & (d < head_dim)[None, :]
    heads64 = heads[:, None].to(tl.int64)
    dst = tl.where(valid, slot, 0)[:, None] * stride_slot + heads64 * stride_ch + d[None, :]  # invalid: no write
    k = tl.load(k_ptr + t * stride_kt + heads64 * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads64 * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


def _check_inputs(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    for name, t in (("k", k), ("v", v)):
        check_heads(name, t, "[tokens, kv_heads, head_dim]")
    if v.shape != k.shape:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must have one shape")
    _, _, kv_heads, head_dim = check_kv_cache(k_cache, v_cache)
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"k and v ({k.dtype}, {v.dtype}) must have the KV cache's dtype {k_cache.dtype}")
    if k.shape[1:] != (kv_heads, head_dim):
        raise ValueError(f"k and v have {k.shape[1]} heads of {k.shape[2]}; the KV cache holds {kv_heads} heads of "
                         f"{head_dim}")
    check_index("slot_mapping", slot_mapping, 1, k.device)
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must be [{k.shape[0]}] (one slot per token of k), got "
                         f"{list(slot_mapping.shape)}")
    check_runnable([k, v, k_cache, v_cache, slot_mapping], "store_kv")


def _check_slots(slot_mapping: torch.Tensor, num_blocks: int, block_size: int) -> None:
    """CPU only: every slot in [0, num_blocks * block_size), else name the first bad token."""
    n_slots = num_blocks * block_size
    bad = (slot_mapping < 0) | (slot_mapping >= n_slots)
    if bad.any():
        t = int(bad.nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{t}] = {int(slot_mapping[t])} is not a slot in [0, {n_slots}) "
                         f"({num_blocks} blocks of {block_size})")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [tokens, kv_heads, head_dim] (any token/head strides, stride 1 on head_dim) into
    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim] (contiguous, k's dtype) at the flat slots
    slot_mapping: int32 [tokens]. On CPU the slots are checked (ValueError); on CUDA nothing syncs and
    out-of-range slots are skipped."""
    _check_inputs(k, v, k_cache, v_cache, slot_mapping)
    if k.device.type == "cpu":
        _check_slots(slot_mapping, k_cache.shape[0], k_cache.shape[1])
    if k.shape[0]:
        _launch(k, v, k_cache, v_cache, slot_mapping)


def store_kv_unchecked(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """store_kv without the input checks (nor the CPU check of the slots), for a caller that has checked these
    shapes and slots already (the model: its first layer's call)."""
    if k.shape[0]:
        _launch(k, v, k_cache, v_cache, slot_mapping)


def _launch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            slot_mapping: torch.Tensor) -> None:
    """The kernel on validated inputs, slots unchecked (tests use it to see out-of-range slots are not written)."""
    tokens, kv_heads, head_dim = k.shape
    block_d = next_power_of_2(head_dim)
    block_h = min(next_power_of_2(kv_heads), max(1, MAX_TILE // block_d))
    grid = (tokens, cdiv(kv_heads, block_h))
    _store_kv_kernel[grid](k_cache, v_cache, k, v, slot_mapping, k_cache.shape[0] * k_cache.shape[1], kv_heads,
                           head_dim, k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1),
                           k_cache.stride(2), BLOCK_H=block_h, BLOCK_D=block_d)


def store_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """The reference: index_copy_ of k and v into the caches viewed as [num_blocks * block_size, kv_heads,
    head_dim] (distinct slots assumed)."""
    slots = slot_mapping.long()
    for src, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, src)
