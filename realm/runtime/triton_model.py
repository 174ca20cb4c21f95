"""The Triton forward: the whole model through realm's own kernels, on the paged KV cache.

    model = TritonModel(load_weights("smollm2"), device="cuda", dtype=torch.float16)
    logits = model.forward(batch, cache)     # a ForwardBatch of ragged chunks, the PagedKVCache

Per layer, on the packed tokens of every sequence of the batch (realm.kernels):

    x, h = rms_norm(out, attn_norm, residual=h)      the residual add fused into the norm
    qkv  = qmatmul(x, W_qkv)                         Q, K, V rows of one format concatenated: one launch
    apply_rope(q, k, positions)                      in place on views of qkv, each token at its own position
    store_kv(k, v, cache, slot_mapping)              this step's K, V into their pages
    o    = attention(q, ...)                         flash attention on this step's K, V (fresh prompts only);
                                                     else paged decode for the one-token sequences (decodes first)
                                                     and paged flash attention for chunks after cached tokens
    x, h = rms_norm(qmatmul(o, W_o), ffn_norm, residual=h)
    out  = qmatmul(silu_mul(qmatmul(x, W_gate_up)), W_down)

Weights stay quantized (realm.quant planes) and are decoded in registers by qmatmul; only the token embedding is
dequantized once, to gather rows from (a lookup, not a matmul). Every kernel accumulates in float32 and rounds once
to `dtype`, so with float32 the forward follows the torch reference to accumulation-order rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from realm.kernels import apply_rope, qmatmul, rms_norm, rope_cache, silu_mul
from realm.kernels.flash_attention import flash_attention, flash_attention_paged
from realm.kernels.paged_attention import paged_decode_attention
from realm.kernels.qdecode import INTERPRETED
from realm.kernels.store_kv import store_kv
from realm.quant import QTensor

from .batch import ForwardBatch
from .kv_cache import PagedKVCache
from .runner import Runner, indexed_device
from .weights import ModelWeights

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Projection:
    """Weights that read the same input, as few qmatmuls as their formats allow: consecutive weights of one format
    are concatenated row-wise (quantized rows are independent, so this is exact) into one launch."""

    parts: tuple[QTensor, ...]  # planes layout, on the device
    sizes: tuple[int, ...]  # output columns of each original weight, in order

    @classmethod
    def fuse(cls, weights: Sequence[QTensor], device: torch.device) -> Projection:
        groups: list[list[QTensor]] = []
        for w in weights:
            if groups and groups[-1][0].fmt == w.fmt:
                groups[-1].append(w)
            else:
                groups.append([w])
        parts = []
        for group in groups:
            rows = sum(w.shape[0] for w in group)
            data = torch.cat([w.gguf_bytes() for w in group]) if len(group) > 1 else group[0].gguf_bytes()
            parts.append(QTensor(data, group[0].fmt, (rows, group[0].shape[1])).repack("planes").to(device))
        return cls(tuple(parts), tuple(w.shape[0] for w in weights))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, K] -> [tokens, sum(sizes)]."""
        outs = [qmatmul(x, w) for w in self.parts]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass(frozen=True)
class _AttentionPlan:
    """Which attention kernels a step runs. Fresh prompts only: flash attention on the step's own K, V. Otherwise
    the leading num_decode sequences (one token each; the engine puts decodes first) through paged decode
    attention, which reads each K/V byte once per query-head group, and the chunks after them (tokens following
    cached ones) through paged flash attention."""

    fresh: bool
    num_decode: int
    decode_max_seq_len: int
    chunk_cu_seqlens: torch.Tensor | None  # the chunks' offsets in q[num_decode:]; None without chunks
    chunk_max_seqlen_q: int

    @classmethod
    def of(cls, batch: ForwardBatch) -> _AttentionPlan:
        d = batch.num_decode
        chunks = d < len(batch.query_lens)
        cu = (batch.cu_seqlens_q[d:] - d if d else batch.cu_seqlens_q) if chunks else None
        return cls(batch.is_fresh_prefill, d, max(batch.context_lens[:d], default=0), cu,
                   max(batch.query_lens[d:], default=0))


@dataclass(frozen=True)
class _Layer:
    attn_norm: torch.Tensor  # float32 [hidden]
    qkv: Projection
    b_qkv: torch.Tensor | None  # [q_size + 2 * kv_size] in the compute dtype (qwen2)
    wo: Projection
    ffn_norm: torch.Tensor
    gate_up: Projection
    down: Projection


class TritonModel(Runner):
    def __init__(self, weights: ModelWeights, device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16):
        self.config = c = weights.config
        self.device = indexed_device(device)
        self.dtype = dtype
        if dtype not in DTYPES:
            raise ValueError(f"the triton backend computes in float16, bfloat16 or float32, got {dtype}")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"the triton backend runs on cuda (or cpu, interpreted), not {self.device}")
        if self.device.type == "cpu" and not INTERPRETED:
            raise ValueError("the triton backend on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 before "
                             "Triton is imported (realm's CLI does this for --backend triton --device cpu), or use "
                             "a CUDA device")
        if self.device.type == "cpu" and dtype == torch.bfloat16:
            raise ValueError("the triton backend cannot run bfloat16 on CPU: Triton's interpreter computes bfloat16 "
                             "tl.dot wrongly; use float32 or float16 there (bfloat16 runs on CUDA)")
        self.embedding = weights.token_embd.dequantize().to(device=self.device, dtype=dtype)  # [vocab, hidden]
        head = weights.token_embd if weights.tied else weights.output
        self.output = Projection.fuse([head], self.device)
        self.output_norm = self._vector(weights.output_norm)
        self.layers = [self._layer(w) for w in weights.layers]
        self.cos_sin = rope_cache(c.head_dim, c.context_length, c.rope_theta, self.device)

    def _vector(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=torch.float32).contiguous()

    def _layer(self, w) -> _Layer:
        b_qkv = w.qkv_bias()
        if b_qkv is not None:
            b_qkv = b_qkv.to(device=self.device, dtype=self.dtype)
        fuse = Projection.fuse
        return _Layer(
            attn_norm=self._vector(w.attn_norm),
            qkv=fuse([w.wq, w.wk, w.wv], self.device),
            b_qkv=b_qkv,
            wo=fuse([w.wo], self.device),
            ffn_norm=self._vector(w.ffn_norm),
            gate_up=fuse([w.w_gate, w.w_up], self.device),
            down=fuse([w.w_down], self.device),
        )

    @torch.inference_mode()
    def _forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        eps = self.config.rms_eps
        plan = _AttentionPlan.of(batch)  # once per step, not per layer
        out = F.embedding(batch.tokens, self.embedding)  # [tokens, hidden]
        h = None  # the residual stream; the first layer's input is the embedding itself
        for i, layer in enumerate(self.layers):
            if h is None:
                h, x = out, rms_norm(out, layer.attn_norm, eps)
            else:
                x, h = rms_norm(out, layer.attn_norm, eps, residual=h)
            o = self._attention(layer, x, batch, plan, cache.layer(i))
            x, h = rms_norm(layer.wo(o), layer.ffn_norm, eps, residual=h)
            out = layer.down(silu_mul(layer.gate_up(x)))
        x = rms_norm(out, self.output_norm, eps, residual=h)[0]
        return self.output(x[batch.logits_rows])

    def _attention(self, layer: _Layer, x: torch.Tensor, batch: ForwardBatch, plan: _AttentionPlan,
                   kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [tokens, hidden] -> attention output [tokens, q_size] (before the output projection)."""
        c = self.config
        n = x.shape[0]
        qkv = layer.qkv(x)  # [tokens, q_size + 2 * kv_size]
        if layer.b_qkv is not None:
            qkv += layer.b_qkv
        q = qkv[:, : c.q_size].view(n, c.n_heads, c.head_dim)
        k = qkv[:, c.q_size : c.q_size + c.kv_size].view(n, c.n_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size :].view(n, c.n_kv_heads, c.head_dim)
        apply_rope(q, k, batch.positions, self.cos_sin)
        k_cache, v_cache = kv
        store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        scale = c.head_dim**-0.5
        if plan.fresh:
            o = flash_attention(q, k, v, batch.cu_seqlens_q, batch.cu_seqlens_q, causal=True, scale=scale,
                                max_seqlen_q=batch.max_seqlen_q)
            return o.view(n, c.q_size)
        d = plan.num_decode
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        if d:
            paged_decode_attention(q[:d], k_cache, v_cache, batch.seq_lens[:d], batch.block_tables[:d], scale=scale,
                                   max_seq_len=plan.decode_max_seq_len, out=o[:d])
        if plan.chunk_cu_seqlens is not None:
            flash_attention_paged(q[d:], k_cache, v_cache, plan.chunk_cu_seqlens, batch.seq_lens[d:],
                                  batch.block_tables[d:], causal=True, scale=scale,
                                  max_seqlen_q=plan.chunk_max_seqlen_q, out=o[d:])
        return o.view(n, c.q_size)
