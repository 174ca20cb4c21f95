"""The torch reference forward of a llama-family model: float32 by default, on CPU or CUDA.

    model = TorchModel(load_weights("smollm2"), device="cpu")
    logits = model.forward(batch, cache)     # batch: a ForwardBatch of ragged chunks; cache: the PagedKVCache


It reproduces HF transformers' llama in float32 op for op (RMSNorm in float32, rotate-half rope with float32
cos/sin, SDPA attention with GQA by repeating K/V heads, SiLU-gated MLP), on weights dequantized once from the
QTensors with realm's bit-exact dequantizer, which is what HF gets from gguf-py. Q/K and gate/up projections are
concatenated into one matrix each (fewer, larger matmuls); each output element is the same dot product.

K and V live in the paged cache (realm.runtime.kv_cache); attention gathers each sequence's pages in torch and runs
SDPA per sequence, so the paging changes no value: the per-token ops (norms, matmuls, rope) run once on the packed
tokens of all sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batch import ForwardBatch
from .config import ModelConfig
from .kv_cache import PagedKVCache
from .runner import Runner, indexed_device
from .weights import ModelWeights


@dataclass(frozen=True)
class _Layer:
    attn_norm: torch.Tensor  # [hidden]
    w_qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    b_qkv: torch.Tensor | None
    wo: torch.Tensor  # [hidden, q_size]
    ffn_norm: torch.Tensor
    w_gate_up: torch.Tensor  # [2 * ffn_hidden, hidden]
    w_down: torch.Tensor  # [hidden, ffn_hidden]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm: normalize in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_tables(config: ModelConfig, positions: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: float32 [positions, head_dim], HF's default rope (frequencies repeated for both halves)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(device), emb.sin().to(device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [..., head_dim]; cos, sin broadcast to it (HF: [batch, heads, T, head_dim] with [T, head_dim])."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def causal_mask(start: int, tokens: int, device) -> torch.Tensor:
    """bool [tokens, start + tokens]: query i (at position start + i) sees keys 0..start + i."""
    keys = torch.arange(start + tokens, device=device)
    return keys[None, :] <= (start + torch.arange(tokens, device=device))[:, None]


class TorchModel(Runner):
    """Weights dequantized to `dtype` on `device`; `forward` computes logits in `dtype` (float32: the reference)."""

    def __init__(self, weights: ModelWeights, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.config = weights.config
        self.device = indexed_device(device)
        self.dtype = dtype
        self.embedding = self._matrix(weights.token_embd.dequantize())
        self.output = self.embedding if weights.tied else self._matrix(weights.output.dequantize())
        self.output_norm = self._matrix(weights.output_norm)
        self.layers = [self._layer(w) for w in weights.layers]
        self.cos, self.sin = rope_tables(self.config, self.config.context_length, self.device)

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(device=self.device, dtype=self.dtype).contiguous()

    def _layer(self, w) -> _Layer:
        b_qkv = w.qkv_bias()
        return _Layer(
            attn_norm=self._matrix(w.attn_norm),
            w_qkv=self._matrix(torch.cat([w.wq.dequantize(), w.wk.dequantize(), w.wv.dequantize()])),
            b_qkv=None if b_qkv is None else self._matrix(b_qkv),
            wo=self._matrix(w.wo.dequantize()),
            ffn_norm=self._matrix(w.ffn_norm),
            w_gate_up=self._matrix(torch.cat([w.w_gate.dequantize(), w.w_up.dequantize()])),
            w_down=self._matrix(w.w_down.dequantize()),
        )

    @torch.inference_mode()
    def _forward(self, batch: ForwardBatch, cache: PagedKVCache) -> torch.Tensor:
        c = self.config
        h = F.embedding(batch.tokens, self.embedding)  # [tokens, hidden]
        positions = batch.positions.long()
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # [tokens, 1, head_dim]
        key_slots = _key_slots(batch, cache.block_size)
        slots = batch.slot_mapping.long()
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, c.rms_eps)
            h = h + self._attention(layer, x, cos, sin, cache.layer(i), slots, key_slots, batch)
            h = h + self._mlp(layer, rms_norm(h, layer.ffn_norm, c.rms_eps))
        h = h[batch.logits_rows]
        return F.linear(rms_norm(h, self.output_norm, c.rms_eps), self.output)

    def _attention(self, layer: _Layer, x: torch.Tensor, cos, sin, kv: tuple[torch.Tensor, torch.Tensor],
                   slots: torch.Tensor, key_slots: list[torch.Tensor], batch: ForwardBatch) -> torch.Tensor:
        c = self.config
        n = x.shape[0]
        q, k, v = F.linear(x, layer.w_qkv, layer.b_qkv).split((c.q_size, c.kv_size, c.kv_size), dim=-1)
        q = apply_rope(q.view(n, c.n_heads, c.head_dim), cos, sin)  # [tokens, heads, head_dim]
        k = apply_rope(k.view(n, c.n_kv_heads, c.head_dim), cos, sin)
        k_flat, v_flat = (t.view(-1, c.n_kv_heads, c.head_dim) for t in kv)  # [slots, kv_heads, head_dim]
        k_flat.index_copy_(0, slots, k)
        v_flat.index_copy_(0, slots, v.view(n, c.n_kv_heads, c.head_dim))
        out = torch.empty(n, c.n_heads, c.head_dim, dtype=x.dtype, device=x.device)
        first = 0
        for q_len, seq_len, keys in zip(batch.query_lens, batch.context_lens, key_slots, strict=True):
            q_seq = q[first : first + q_len].transpose(0, 1)[None]  # [1, heads, q_len, head_dim]
            k_seq = k_flat[keys].transpose(0, 1)[None]  # [1, kv_heads, seq_len, head_dim]
            v_seq = v_flat[keys].transpose(0, 1)[None]
            start = seq_len - q_len
            mask = causal_mask(start, q_len, x.device) if start and q_len > 1 else None
            # enable_gqa: each KV head serves n_heads / n_kv_heads query heads without copying K and V
            o = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask,
                                               is_causal=mask is None and q_len > 1, scale=c.head_dim**-0.5,
                                               enable_gqa=True)
            out[first : first + q_len] = o[0].transpose(0, 1)
            first += q_len
        return F.linear(out.view(n, c.q_size), layer.wo)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.w_down)


def _key_slots(batch: ForwardBatch, block_size: int) -> list[torch.Tensor]:
    """Each sequence's flat cache slots for its tokens 0 .. seq_len - 1 (its pages, gathered in token order)."""
    out = []
    for row, seq_len in zip(batch.block_tables, batch.context_lens, strict=True):
        t = torch.arange(seq_len, device=row.device)
        out.append(row[t // block_size].long() * block_size + t % block_size)
    return out
