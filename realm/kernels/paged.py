"""The paged KV-cache layout that realm's attention kernels read, its input checks, and the torch gather the
references use.

A layer's cache is two tensors, K and V, each [num_blocks, block_size, kv_heads, head_dim]: token t of a sequence
lives in block `block_table[seq, t // block_size]` at row `t % block_size`, i.e. at the flat slot
`block * block_size + t % block_size` of the cache viewed as [num_blocks * block_size, kv_heads, head_dim]. A block
holds whole tokens (all heads), so one block-table lookup serves every head, and a sequence's blocks need not be
adjacent or in order (vLLM's PagedAttention, Kwon et al. 2023).

Block tables are int32 [batch, max_blocks]; columns past a sequence's last block are never read (fill them with
anything in range, e.g. 0). Sequence lengths are int32 [batch].

Checks on the *contents* of block tables, lengths and slots need the values on the host. On CPU tensors the launchers
check them and raise; on CUDA they do not look (it would cost a device-to-host sync per layer and step, and the
runtime builds these tables on the host, where `realm.runtime` checks them): the kernels then never read or write out
of bounds, and attention rows of a sequence whose block ids are out of range come out NaN.
"""

from __future__ import annotations

import torch

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32,)


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], same shape, dtype and device, contiguous.
    Returns (num_blocks, block_size, kv_heads, head_dim)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [num_blocks, block_size, kv_heads, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in KV_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} on {k_cache.device} and v_cache "
                         f"{tuple(v_cache.shape)} {v_cache.dtype} on {v_cache.device} must match")
    if 0 in k_cache.shape:
        raise ValueError(f"the KV cache has an empty dimension: {tuple(k_cache.shape)}")
    return tuple(k_cache.shape)


def check_index(name: str, t: torch.Tensor, dims: int, device: torch.device) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other tensors on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_block_table(block_table: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int, block_size: int,
                      device: torch.device) -> None:
    """block_table: int32 [batch, max_blocks]; seq_lens: int32 [batch], tokens of each sequence in the cache.
    Shapes always; contents (lengths >= 0 and within the table, block ids in range) when on the CPU."""
    check_index("seq_lens", seq_lens, 1, device)
    check_index("block_table", block_table, 2, device)
    if block_table.shape[0] != seq_lens.shape[0]:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for {seq_lens.shape[0]} sequences")
    if device.type != "cpu" or seq_lens.numel() == 0:
        return
    lens = seq_lens.tolist()
    capacity = block_table.shape[1] * block_size
    for b, n in enumerate(lens):
        if not 0 <= n <= capacity:
            raise ValueError(f"sequence {b} has length {n}; its block table row holds {block_table.shape[1]} blocks "
                             f"of {block_size} tokens ({capacity})")
        used = block_table[b, : -(-n // block_size)]
        bad = (used < 0) | (used >= num_blocks)
        if bad.any():
            col = int(bad.nonzero()[0, 0])
            raise ValueError(f"block_table[{b}, {col}] = {int(used[col])} is not a block id in [0, {num_blocks})")


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> list[torch.Tensor]:
    """The references' view of a paged cache: for each sequence its tokens [seq_len, kv_heads, head_dim], gathered
    from cache [num_blocks, block_size, kv_heads, head_dim] through its block table row."""
    block_size = cache.shape[1]
    flat = cache.reshape(-1, *cache.shape[2:])
    out = []
    for row, n in zip(block_table.tolist(), seq_lens.tolist(), strict=True):
        t = torch.arange(n, device=cache.device)
        blocks = torch.tensor(row, device=cache.device)[t // block_size]
        out.append(flat[blocks * block_size + t % block_size])
    return out
