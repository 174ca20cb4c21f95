"""A step's attention over the paged KV cache: which kernels run for which sequences, and the exact reference.

    meta = AttentionMetadata.build(query_lens, context_lens, cu_seqlens_q, seq_lens, block_tables)   # once a step
    o = paged_attention(q, k, v, k_cache, v_cache, meta, scale)          # the Triton kernels
    o = paged_attention_ref(q, k, v, k_cache, v_cache, meta, scale)      # torch SDPA, HF transformers' computation

The queries of a step are the packed chunks of its sequences: chunk b holds the LAST query_lens[b] of the
context_lens[b] tokens its sequence has in the cache after this step (their K and V already stored). The Triton
path picks its kernels once per step (`AttentionMetadata`), not per layer:

- no sequence has cached tokens (fresh prompts only): `flash_attention` on the step's own K and V;
- otherwise the engine orders the chunks decodes first, then chunks of 2 .. MAX_VERIFY_QUERIES queries (speculative
  verification: k + 1 tokens), then the rest, and three launches serve the three runs: the leading `num_decode`
  sequences, one query each, through `paged_decode_attention`, which reads each K/V byte once per group of query
  heads; the following `num_verify` sequences of 2 .. MAX_VERIFY_QUERIES queries through `paged_verify_attention`,
  which reads each K/V byte once per group for all of a chunk's queries; the chunks after them (longer prefill
  chunks, and any short chunk after a long one) through `flash_attention_paged`.

The reference runs torch's scaled_dot_product_attention per sequence on its keys gathered from the pages, causal
within the chunk: op for op what HF transformers' llama does in float32 (`attn_implementation="sdpa"`), so the torch
backend's logits stay bit-identical to HF's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .checks import check_heads, check_softcap, check_window
from .flash_attention import MAX_HEAD_DIM
from .flash_attention import _launch as _flash_launch
from .flash_attention import default_config as flash_config
from .paged import check_kv_cache
from .paged_attention import PagedDecodePlan, plan_decode
from .paged_attention import _launch as _decode_launch
from .qdecode import check_runnable
from .verify_attention import MAX_VERIFY_QUERIES, PagedVerifyPlan, plan_verify
from .verify_attention import _launch as _verify_launch


@dataclass
class AttentionMetadata:
    """One step's attention layout: host copies of the lengths (to plan without a device sync) and the device index
    tensors the kernels read."""

    query_lens: tuple[int, ...]  # new tokens of each sequence in this step
    context_lens: tuple[int, ...]  # tokens of each sequence in the cache after this step
    cu_seqlens_q: torch.Tensor  # int32 [batch + 1]: chunk offsets in the packed queries
    seq_lens: torch.Tensor  # int32 [batch]: context_lens on the device
    block_tables: torch.Tensor  # int32 [batch, max_blocks]
    fresh: bool = False  # no sequence has cached tokens
    num_decode: int = 0  # leading sequences with one query each
    chunk_cu_seqlens: torch.Tensor | None = None  # offsets of the chunks after the decodes (0 first); None: none
    # The run of sequences after the decodes with 2 .. MAX_VERIFY_QUERIES queries each (counted in fresh steps too,
    # as num_decode is; those run flash_attention alone).
    num_verify: int = 0
    verify_cu_seqlens: torch.Tensor | None = None  # their chunks' offsets (0 first); None: none, or fresh
    flash_cu_seqlens: torch.Tensor | None = None  # offsets of the chunks after those (0 first); None: no such chunk
    _decode_plans: dict = field(default_factory=dict, repr=False)
    _verify_plans: dict = field(default_factory=dict, repr=False)
    _key_slots: list[torch.Tensor] | None = field(default=None, repr=False)
    _cpu_plans: dict = field(default_factory=dict, repr=False)  # realm.kernels.cpu_attention's, per cache shape

    @classmethod
    def build(cls, query_lens, context_lens, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor) -> AttentionMetadata:
        query_lens, context_lens = tuple(query_lens), tuple(context_lens)
        batch = len(query_lens)
        d = next((b for b, q in enumerate(query_lens) if q != 1), batch)
        v = next((b for b in range(d, batch) if not 2 <= query_lens[b] <= MAX_VERIFY_QUERIES), batch) - d
        fresh = all(q == c for q, c in zip(query_lens, context_lens, strict=True))
        chunk_cu = verify_cu = flash_cu = None
        if d < batch and not fresh:
            chunk_cu = cu_seqlens_q[d:] - d if d else cu_seqlens_q
            verify_cu = chunk_cu[: v + 1] if v else None
            if d + v < batch:
                flash_cu = chunk_cu[v:] - sum(query_lens[d : d + v]) if v else chunk_cu
        return cls(query_lens, context_lens, cu_seqlens_q, seq_lens, block_tables, fresh, d, chunk_cu, v, verify_cu,
                   flash_cu)

    @property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens)

    @property
    def decode_max_seq_len(self) -> int:
        return max(self.context_lens[: self.num_decode], default=0)

    @property
    def verify_tokens(self) -> int:
        """Query rows of the verify chunks (they follow the num_decode decode rows)."""
        return sum(self.query_lens[self.num_decode : self.num_decode + self.num_verify])

    @property
    def verify_max_seq_len(self) -> int:
        return max(self.context_lens[self.num_decode : self.num_decode + self.num_verify], default=0)

    @property
    def verify_max_seqlen_q(self) -> int:
        return max(self.query_lens[self.num_decode : self.num_decode + self.num_verify], default=0)

    @property
    def chunk_max_seqlen_q(self) -> int:
        """The longest chunk after the decodes and the verify chunks (the flash_attention_paged launch)."""
        return max(self.query_lens[self.num_decode + self.num_verify :], default=0)

    def decode_plan(self, n_kv_heads: int, device: torch.device) -> PagedDecodePlan:
        """plan_decode for this step's decode rows, computed once and reused by every layer."""
        plan = self._decode_plans.get(n_kv_heads)
        if plan is None:
            plan = self._decode_plans[n_kv_heads] = plan_decode(self.num_decode, n_kv_heads,
                                                                self.decode_max_seq_len, device)
        return plan

    def verify_plan(self, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                    device: torch.device) -> PagedVerifyPlan:
        """plan_verify for this step's verify chunks, computed once per head layout and reused by every layer."""
        key = (n_heads, n_kv_heads, head_dim, dtype)
        plan = self._verify_plans.get(key)
        if plan is None:
            plan = self._verify_plans[key] = plan_verify(self.num_verify, n_heads, n_kv_heads, head_dim,
                                                         self.verify_max_seqlen_q, self.verify_max_seq_len, dtype,
                                                         device)
        return plan

    def key_slots(self, block_size: int) -> list[torch.Tensor]:
        """Each sequence's flat cache slots for its tokens 0 .. context_len - 1, in token order (the reference)."""
        if self._key_slots is None:
            self._key_slots = []
            for row, n in zip(self.block_tables, self.context_lens, strict=True):
                t = torch.arange(n, device=row.device)
                self._key_slots.append(row[t // block_size].long() * block_size + t % block_size)
        return self._key_slots


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q [tokens, n_heads, head_dim], this step's k, v [tokens, n_kv_heads, head_dim] (already in the cache too);
    k_cache, v_cache: one layer's pages [num_blocks, block_size, n_kv_heads, head_dim] -> [tokens, n_heads,
    head_dim]. Checks the tensors' shapes, dtypes and devices; the index tensors' contents were checked on the host
    when the step was built (ForwardBatch.build). window: sliding-window attention (a query sees the `window` keys
    ending at its own position); None: every earlier key. softcap: Gemma 2's soft-capped scores."""
    check_attention(q, k, v, k_cache, v_cache, meta)
    check_window(window)
    check_softcap(softcap)
    return paged_attention_unchecked(q, k, v, k_cache, v_cache, meta, scale, window, softcap)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_heads(name, t)
    tokens, n_heads, head_dim = q.shape
    _, _, n_kv_heads, cache_head_dim = check_kv_cache(k_cache, v_cache)
    if k.shape != (tokens, n_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {list(k.shape)} and v {list(v.shape)} must be [{tokens}, {n_kv_heads}, {head_dim}]")
    if cache_head_dim != head_dim or n_heads % n_kv_heads or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"q's {n_heads} heads of {head_dim} do not fit the KV cache's {n_kv_heads} heads of "
                         f"{cache_head_dim} (a multiple of them, head_dim <= {MAX_HEAD_DIM})")
    if len({q.dtype, k.dtype, v.dtype, k_cache.dtype}) != 1:
        raise ValueError(f"q, k, v and the KV cache must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}, "
                         f"{k_cache.dtype}")
    if sum(meta.query_lens) != tokens:
        raise ValueError(f"q has {tokens} tokens but the step's chunks {sum(meta.query_lens)}")
    check_runnable([q, k, v, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens, meta.block_tables],
                   "paged_attention")


def paged_attention_unchecked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                              window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """paged_attention without the checks, for the layers after the first of a step (same shapes)."""
    if meta.fresh:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        _flash_launch(out, q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_q, None, causal=True, scale=scale,
                      max_seqlen_q=meta.max_seqlen_q, config=flash_config(q.shape[2], q.dtype), window=window,
                      softcap=softcap)
        return out
    d, v = meta.num_decode, meta.num_verify
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if d:
        plan = meta.decode_plan(k_cache.shape[2], q.device)
        _decode_launch(q[:d], k_cache, v_cache, meta.seq_lens[:d], meta.block_tables[:d], scale, plan, out[:d],
                       window, softcap)
    rest = d + meta.verify_tokens  # the first query row after the decodes and the verify chunks
    if meta.verify_cu_seqlens is not None:
        plan = meta.verify_plan(q.shape[1], k_cache.shape[2], q.shape[2], q.dtype, q.device)
        _verify_launch(q[d:rest], k_cache, v_cache, meta.verify_cu_seqlens, meta.seq_lens[d : d + v],
                       meta.block_tables[d : d + v], scale, plan, out[d:rest], window, softcap)
    if meta.flash_cu_seqlens is not None:
        _flash_launch(out[rest:], q[rest:], k_cache, v_cache, meta.flash_cu_seqlens, meta.seq_lens[d + v :],
                      meta.block_tables[d + v :], causal=True, scale=scale, max_seqlen_q=meta.chunk_max_seqlen_q,
                      config=flash_config(q.shape[2], q.dtype), window=window, softcap=softcap)
    return out


def paged_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                        window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The reference: per sequence, its keys and values gathered from the pages, SDPA with GQA (each KV head serves
    n_heads / n_kv_heads query heads without copies), causal within the chunk; with a window, through a boolean
    mask as HF passes its sliding-window mask to SDPA; with a softcap, HF's eager attention (Gemma 2: scores times
    scale, capped, masked, softmax in float32, times V), which SDPA cannot do. k, v are unused: the pages hold
    them."""
    k_flat = k_cache.view(-1, *k_cache.shape[2:])  # [slots, n_kv_heads, head_dim]
    v_flat = v_cache.view(-1, *v_cache.shape[2:])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    first = 0
    for q_len, keys in zip(meta.query_lens, meta.key_slots(k_cache.shape[1]), strict=True):
        out[first : first + q_len] = attend_sequence(q[first : first + q_len], k_flat[keys], v_flat[keys], scale,
                                                     window, softcap)
        first += q_len
    return out


def attend_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """One sequence of the reference: q [q_len, heads, D], the last q_len of its seq_len tokens; k, v [seq_len,
    kv_heads, D] gathered -> [q_len, heads, D]."""
    q_len, seq_len = q.shape[0], k.shape[0]
    start = seq_len - q_len
    if softcap is not None:
        return _eager_softcapped(q, k, v, start, scale, softcap, window)
    if window is not None and seq_len > window:
        mask = _causal_mask(start, q_len, q.device, window)
    else:
        mask = _causal_mask(start, q_len, q.device) if start and q_len > 1 else None
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, is_causal=mask is None and q_len > 1, scale=scale,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


def _eager_softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float, softcap: float,
                      window: int | None) -> torch.Tensor:
    """One sequence as HF's Gemma 2 eager attention: q [q_len, heads, D] at positions start.., k, v [seq_len,
    kv_heads, D] -> [q_len, heads, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).transpose(0, 1), v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) * scale  # [heads, q_len, seq_len]
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~_causal_mask(start, q.shape[0], q.device, window), float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).transpose(0, 1)


def _causal_mask(start: int, tokens: int, device, window: int | None = None) -> torch.Tensor:
    """bool [tokens, start + tokens]: query i (at position start + i) sees keys 0 .. start + i (with a window, only
    those > start + i - window)."""
    keys = torch.arange(start + tokens, device=device)[None, :]
    pos = (start + torch.arange(tokens, device=device))[:, None]
    visible = keys <= pos
    return visible if window is None else visible & (keys > pos - window)
