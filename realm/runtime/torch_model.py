"""The torch reference forward of a llama-family model: float32 by default, on CPU or CUDA.

    model = TorchModel(load_weights("smollm2"), device="cpu")
    logits = model.forward(tokens)                          # tokens: [batch, T] -> logits [batch, T, vocab]
    logits = model.forward(tokens, cache=cache, start=n)    # T new tokens after n cached ones

It reproduces HF transformers' llama in float32 op for op (RMSNorm in float32, rotate-half rope with float32
cos/sin, SDPA attention with GQA by repeating K/V heads, SiLU-gated MLP), on weights dequantized once from the
QTensors with realm's bit-exact dequantizer, which is what HF gets from gguf-py. Q/K and gate/up projections are
concatenated into one matrix each (fewer, larger matmuls); each output element is the same dot product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .kv_cache import KVCache
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
    """x: [batch, heads, T, head_dim]; cos, sin: [T, head_dim]."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def causal_mask(start: int, tokens: int, device) -> torch.Tensor:
    """bool [tokens, start + tokens]: query i (at position start + i) sees keys 0..start + i."""
    keys = torch.arange(start + tokens, device=device)
    return keys[None, :] <= (start + torch.arange(tokens, device=device))[:, None]


class TorchModel:
    """Weights dequantized to `dtype` on `device`; `forward` computes logits in `dtype` (float32: the reference)."""

    def __init__(self, weights: ModelWeights, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.config = weights.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.embedding = self._matrix(weights.token_embd.dequantize())
        self.output = self.embedding if weights.tied else self._matrix(weights.output.dequantize())
        self.output_norm = self._matrix(weights.output_norm)
        self.layers = [self._layer(w) for w in weights.layers]
        self.cos, self.sin = rope_tables(self.config, self.config.context_length, self.device)

    def _matrix(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(device=self.device, dtype=self.dtype).contiguous()

    def _layer(self, w) -> _Layer:
        c = self.config
        biases = ((w.bq, c.q_size), (w.bk, c.kv_size), (w.bv, c.kv_size))
        b_qkv = None
        if any(b is not None for b, _ in biases):
            b_qkv = self._matrix(torch.cat([b if b is not None else torch.zeros(n) for b, n in biases]))
        return _Layer(
            attn_norm=self._matrix(w.attn_norm),
            w_qkv=self._matrix(torch.cat([w.wq.dequantize(), w.wk.dequantize(), w.wv.dequantize()])),
            b_qkv=b_qkv,
            wo=self._matrix(w.wo.dequantize()),
            ffn_norm=self._matrix(w.ffn_norm),
            w_gate_up=self._matrix(torch.cat([w.w_gate.dequantize(), w.w_up.dequantize()])),
            w_down=self._matrix(w.w_down.dequantize()),
        )

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        return KVCache.allocate(self.config, batch, capacity, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """tokens: int [batch, T] at positions [start, start + T) -> logits [batch, T, vocab] in `dtype`
        ([batch, 1, vocab] with last_only: what generation needs, skipping the output head for the other positions).

        Without a cache, start must be 0 and the T tokens attend only to each other.
        """
        batch, n = tokens.shape
        if cache is None:
            if start:
                raise ValueError("forward without a cache starts at position 0")
        else:
            cache.check_room(start, n)
            if cache.batch != batch:
                raise ValueError(f"tokens have batch {batch}, the cache {cache.batch}")
        if start + n > self.config.context_length:
            raise ValueError(f"positions up to {start + n} exceed the context length {self.config.context_length}")
        h = F.embedding(tokens.to(self.device), self.embedding)  # [batch, T, hidden]
        cos, sin = self.cos[start : start + n], self.sin[start : start + n]
        mask = causal_mask(start, n, self.device) if start and n > 1 else None
        for i, layer in enumerate(self.layers):
            h = h + self._attention(i, layer, rms_norm(h, layer.attn_norm, self.config.rms_eps), cos, sin, cache,
                                    start, mask)
            h = h + self._mlp(layer, rms_norm(h, layer.ffn_norm, self.config.rms_eps))
        if cache is not None:
            cache.length = start + n
        if last_only:
            h = h[:, -1:]
        return F.linear(rms_norm(h, self.output_norm, self.config.rms_eps), self.output)

    def _attention(self, i: int, layer: _Layer, x: torch.Tensor, cos, sin, cache: KVCache | None, start: int,
                   mask: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        batch, n, _ = x.shape
        qkv = F.linear(x, layer.w_qkv, layer.b_qkv)
        q, k, v = qkv.split((c.q_size, c.kv_size, c.kv_size), dim=-1)
        q = q.view(batch, n, c.n_heads, c.head_dim).transpose(1, 2)  # [batch, heads, T, head_dim]
        k = k.view(batch, n, c.n_kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(batch, n, c.n_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(i, start, k, v)  # [batch, kv_heads, start + T, head_dim]
        # enable_gqa: each KV head serves n_heads / n_kv_heads query heads without copying K and V
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and n > 1,
                                             scale=c.head_dim**-0.5, enable_gqa=True)
        return F.linear(out.transpose(1, 2).reshape(batch, n, c.q_size), layer.wo)

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.w_gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.w_down)
