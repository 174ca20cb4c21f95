"""The llama-family forward (llama, qwen2, qwen3, phi3, gemma3), written once over the op layer (realm.runtime.ops).

    net = Transformer(load_weights("smollm2"), Backend.TORCH, device="cpu")      # or Backend.TRITON on CUDA
    logits = net.forward(batch, kv)       # a ForwardBatch of ragged chunks, the PagedKVCache -> [rows, vocab]

Per layer, on the packed tokens of every sequence of the step:

    x, h = rms_norm(out, attn_norm, residual=h)      the residual add fused into the norm (the first layer: h = out)
    qkv  = qkv_proj(x)                               Q, K, V rows stacked: one linear layer (+ qwen2's biases)
    q, k = rms_norm(q), rms_norm(k)                  qwen3, gemma3: each head normalised on its own
    q, k = rope(q, k, positions)                     rotate-half, each token at its own position
    store_kv(k, v, pages, slot_mapping)              this step's K, V into their pages
    o    = attention(q, k, v, pages, step)           the step's attention plan (realm.kernels.attention), over the
                                                     last `sliding_window` keys where the model has one
    o    = rms_norm(o_proj(o), post_attn_norm)       gemma3 only (its out = rms_norm(out, post_ffn_norm) likewise)
    x, h = rms_norm(o, ffn_norm, residual=h)
    out  = down_proj(silu_mul(gate_up_proj(x)))      gate and up rows stacked: one linear layer (gemma3: GELU-tanh)
    logits = head(rms_norm(out, output_norm, residual=h)[rows])   only the rows the step asks for

With the reference ops (Backend.TORCH) in float32 this is HF transformers' llama op for op: RMSNorm in float32, the
residual stream added as HF adds it, rotate-half rope with float32 cos/sin, SDPA with GQA, SiLU-gated MLP, linear
layers on the dequantized weights (realm's bit-exact decoder, what HF gets from gguf-py), so its logits are HF's bit
for bit. With the Triton ops the weights stay quantized and every kernel accumulates in float32 and rounds once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from realm.kernels.rope import rope_cache
from realm.lora import Target

from .batch import ForwardBatch
from .config import Activation, RopeScaling
from .kv_cache import DEFAULT_BLOCK_SIZE, KVCache, PagedKVCache
from .linear import Linear
from .ops import Backend, Ops, backend_of, check_onednn, ops_for
from .plan import ChunkPlan, StepPlan
from .weights import LayerWeights, ModelWeights

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def indexed_device(device: torch.device | str) -> torch.device:
    """The device as tensors on it report it: cuda -> cuda:<current> (torch.device("cuda") != torch.device("cuda:0")),
    and cpu:0 -> cpu (CPU tensors have no index)."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass(eq=False)
class Embedding:
    """Token ids -> rows of the token embedding, with the linear layers' `reduce` epilogue (realm.runtime.linear).

    A vocabulary-parallel shard (realm.parallel.tensor_parallel) holds only the rows of ids [start, start + rows):
    it looks up the ids in its range and gives zeros for the others, and `reduce` (the all-reduce) sums the ranks'
    lookups into the whole one. Each id's row comes from exactly one rank, the others adding zeros, so the sum is
    the whole lookup bit for bit."""

    weight: torch.Tensor  # [rows, hidden] in the compute dtype
    vocab_size: int  # the whole model's vocabulary
    start: int = 0  # the id of weight's first row
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        rows = self.weight.shape[0]
        if self.start < 0 or self.start + rows > self.vocab_size:
            raise ValueError(f"token_embd rows [{self.start}, {self.start + rows}) are not within the vocabulary of "
                             f"{self.vocab_size}")

    @property
    def whole(self) -> bool:
        return self.weight.shape[0] == self.vocab_size

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> [T, hidden]: the whole embeddings (a shard's after its reduce)."""
        if not self.whole and self.reduce is None:  # the partial lookup alone would be silently wrong
            raise ValueError(f"this token embedding holds only ids [{self.start}, {self.start + self.weight.shape[0]})"
                             f" of {self.vocab_size}: a vocabulary-parallel shard needs its reduce (the all-reduce, "
                             f"realm.parallel.tensor_parallel.attach_collectives)")
        out = self.lookup(tokens)
        return out if self.reduce is None else self.reduce(out)

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T] -> this shard's part [T, hidden] before the reduce: its ids' rows, zeros for the other ids."""
        if self.whole:
            return F.embedding(tokens, self.weight)
        local = tokens - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(inside, local, 0), self.weight)  # row 0 stands in for ids outside
        return out.masked_fill_(~inside.unsqueeze(-1), 0)


@dataclass(eq=False)
class Layer:
    attn_norm: torch.Tensor  # float32 [hidden]
    qkv: Linear  # [q_size + 2 * kv_size] outputs
    o: Linear
    ffn_norm: torch.Tensor
    gate_up: Linear  # [2 * ffn_hidden] outputs
    down: Linear
    q_norm: torch.Tensor | None = None  # float32 [head_dim]: RMSNorm over each Q head before rope (qwen3, gemma3)
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None  # float32 [hidden]: Gemma's norms on the attention and MLP outputs
    post_ffn_norm: torch.Tensor | None = None
    window: int | None = None  # sliding-window attention on this layer (None: global)
    cos_sin: torch.Tensor | None = None  # this layer's rope table (Gemma 3's local layers have their own base)


class Transformer:
    """A model's weights on a device, prepared for one backend's ops, and the forward over a ForwardBatch."""

    def __init__(self, weights: ModelWeights, backend: Backend | str = Backend.TORCH,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.backend = backend_of(backend)
        self.config = c = weights.config
        self.device = indexed_device(device)
        self.dtype = dtype
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device} is not supported; use cpu or cuda")
        if self.backend is Backend.TRITON:
            _check_triton_device(self.device, dtype)
        if self.backend is Backend.ONEDNN:
            check_onednn(self.device, dtype)
        self.ops: Ops = ops_for(self.backend)
        self.embed = Embedding(weights.token_embd.dequantize().to(device=self.device, dtype=dtype), c.vocab_size,
                               weights.vocab_start)
        # The reference's tied head multiplies the embedding matrix itself, as HF does; Triton's reads the quantized
        # embedding rows.
        tied_dense = self.embedding if weights.tied and not self.ops.group_by_format else None
        self.head = self._linear("output", [weights.output], None, dense=tied_dense)
        self.output_norm = self._vector(weights.output_norm)
        self.layers = [self._layer(i, w) for i, w in enumerate(weights.layers)]
        self._rope_tables: dict[tuple, torch.Tensor] = {}
        self.cos_sin = self._rope_table(c.rope_theta, c.rope_scaling, weights.rope_freqs)  # the global layers'
        for i, layer in enumerate(self.layers):
            theta, scaling = c.layer_rope(i)
            layer.cos_sin = self._rope_table(theta, scaling, weights.rope_freqs)
            layer.window = c.layer_window(i)
        self.embed_scale = torch.tensor(c.hidden**0.5, dtype=dtype) if c.arch.embed_scale else None
        self.gelu = c.arch.activation is Activation.GELU_TANH
        self.scale = c.attention_scale

    @property
    def embedding(self) -> torch.Tensor:
        """The token embedding's rows [rows, hidden] (a tensor-parallel shard's: its vocabulary range's)."""
        return self.embed.weight

    def __repr__(self) -> str:
        return (f"Transformer({self.config.n_layers} layers, backend={self.backend.value}, device={self.device}, "
                f"dtype={str(self.dtype).removeprefix('torch.')})")

    def _rope_table(self, theta: float, scaling: RopeScaling, freq_factors: torch.Tensor | None) -> torch.Tensor:
        c = self.config
        key = (theta, scaling)
        if key not in self._rope_tables:
            self._rope_tables[key] = rope_cache(c.head_dim, c.context_length, theta, self.device,
                                                scaling.inv_freq(c.head_dim, theta, freq_factors),
                                                scaling.attention_factor)
        return self._rope_tables[key]

    def _vector(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(device=self.device, dtype=torch.float32).contiguous()

    def _linear(self, name: str, weights, bias, dense=None) -> Linear:
        return Linear.build(name, weights, bias, self.ops, self.device, self.dtype, dense=dense)

    def _layer(self, i: int, w: LayerWeights) -> Layer:
        return Layer(
            attn_norm=self._vector(w.attn_norm),
            qkv=self._linear(f"blk.{i}.attn_qkv", [w.wq, w.wk, w.wv], w.qkv_bias()),
            o=self._linear(f"blk.{i}.attn_output", [w.wo], None),
            ffn_norm=self._vector(w.ffn_norm),
            gate_up=self._linear(f"blk.{i}.ffn_gate_up", [w.w_gate, w.w_up], None),
            down=self._linear(f"blk.{i}.ffn_down", [w.w_down], None),
            q_norm=None if w.q_norm is None else self._vector(w.q_norm),
            k_norm=None if w.k_norm is None else self._vector(w.k_norm),
            post_attn_norm=None if w.post_attn_norm is None else self._vector(w.post_attn_norm),
            post_ffn_norm=None if w.post_ffn_norm is None else self._vector(w.post_ffn_norm),
        )

    def lora_layers(self) -> list[tuple[int, tuple[Target, ...], Linear]]:
        """The layers an adapter may adapt: (layer index, the targets the linear layer fuses, in output order, it)."""
        return [(i, targets, linear) for i, layer in enumerate(self.layers) for targets, linear in (
            ((Target.Q, Target.K, Target.V), layer.qkv), ((Target.O,), layer.o),
            ((Target.GATE, Target.UP), layer.gate_up), ((Target.DOWN,), layer.down))]

    def linears(self) -> list[Linear]:
        """Every linear layer, in forward order (the head last): where epilogues are attached."""
        return [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)] + [self.head]

    # ---------------------------------------------------------------------------------------------------- forward

    def forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        """Runs batch's packed chunks, storing their K and V in kv -> logits [batch.num_logits, vocab] in `dtype`."""
        self.check_step(batch, kv)
        with torch.inference_mode():
            return self._forward(batch, kv)

    def check_step(self, batch: ForwardBatch, kv: PagedKVCache) -> None:
        c = self.config
        if batch.max_seq_len > c.context_length:
            raise ValueError(f"a sequence reaches position {batch.max_seq_len}, past the context length "
                             f"{c.context_length}")
        if kv.k.dtype != self.dtype or kv.k.device != self.device:
            raise ValueError(f"the KV cache is {kv.k.dtype} on {kv.k.device}; this model computes in {self.dtype} on "
                             f"{self.device}")
        if kv.k.shape[0] != c.n_layers or kv.k.shape[3:] != (c.n_kv_heads, c.head_dim):
            raise ValueError(f"the KV cache's shape {tuple(kv.k.shape)} does not fit this model's {c.n_layers} "
                             f"layers of {c.n_kv_heads} KV heads x {c.head_dim}")

    def _forward(self, batch: ForwardBatch, kv: PagedKVCache) -> torch.Tensor:
        eps = self.config.rms_eps
        out = self.embed(batch.tokens)  # [tokens, hidden], whole on every rank (a shard's after its all-reduce)
        if self.embed_scale is not None:  # Gemma: times sqrt(hidden) rounded to the dtype, as HF scales it
            out = out * self.embed_scale
        h = None  # the residual stream; the first layer's input is the embedding itself
        for i, layer in enumerate(self.layers):
            ops = self.ops if i == 0 else self.ops.fast  # the first layer checks what every layer's ops will see
            if h is None:
                h, x = out, ops.rms_norm(out, layer.attn_norm, eps)
            else:
                x, h = ops.rms_norm(out, layer.attn_norm, eps, residual=h)
            o = self._attention(ops, layer, x, batch, kv.layer(i))
            if layer.post_attn_norm is not None:
                o = ops.rms_norm(o, layer.post_attn_norm, eps)
            x, h = ops.rms_norm(o, layer.ffn_norm, eps, residual=h)
            gate_up = layer.gate_up(x, batch)
            act = ops.gelu_tanh_mul(gate_up) if self.gelu else ops.silu_mul(gate_up)
            out = layer.down(act, batch)
            if layer.post_ffn_norm is not None:
                out = ops.rms_norm(out, layer.post_ffn_norm, eps)
        ops = self.ops
        rows = batch.logits_rows
        if rows.shape[0] == 0:
            return torch.empty(0, self.config.vocab_size, dtype=self.dtype, device=self.device)
        x, _ = ops.rms_norm(out[rows], self.output_norm, eps, residual=h[rows])
        logits = self.head(x, batch)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap  # Gemma 2, as HF caps its logits

    def _attention(self, ops: Ops, layer: Layer, x: torch.Tensor, batch: ForwardBatch,
                   kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [tokens, hidden] -> the output projection of attention [tokens, hidden]."""
        c = self.config
        n = x.shape[0]
        qkv = layer.qkv(x, batch)  # [tokens, q_size + 2 * kv_size]
        q = qkv[:, : c.q_size].view(n, c.n_heads, c.head_dim)
        k = qkv[:, c.q_size : c.q_size + c.kv_size].view(n, c.n_kv_heads, c.head_dim)
        v = qkv[:, c.q_size + c.kv_size :].view(n, c.n_kv_heads, c.head_dim)
        if layer.q_norm is not None:  # each head normalised on its own, as HF's Qwen3 does
            q = ops.rms_norm(q.reshape(-1, c.head_dim), layer.q_norm, c.rms_eps).view(n, c.n_heads, c.head_dim)
            k = ops.rms_norm(k.reshape(-1, c.head_dim), layer.k_norm, c.rms_eps).view(n, c.n_kv_heads, c.head_dim)
        q, k = ops.rope(q, k, batch.positions, layer.cos_sin)
        k_cache, v_cache = kv
        ops.store_kv(k, v, k_cache, v_cache, batch.slot_mapping)
        o = ops.attention(q, k, v, k_cache, v_cache, batch.attention, self.scale, window=layer.window,
                          softcap=c.attn_softcap)
        return layer.o(o.view(n, c.q_size), batch)

    # ------------------------------------------------------------------------------------ rectangular [batch, T]

    def new_cache(self, batch: int, capacity: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVCache:
        """A paged cache for `batch` sequences of up to `capacity` tokens each."""
        return KVCache(self.config, batch, capacity, self.dtype, self.device, block_size)

    def forward_tokens(self, tokens: Sequence[Sequence[int]] | torch.Tensor, cache: KVCache | None = None,
                       start: int = 0, last_only: bool = False, adapter: int = -1,
                       lora_slots: int = 0) -> torch.Tensor:
        """tokens: ids [batch, T] at positions [start, start + T) -> logits [batch, T, vocab] ([batch, 1, vocab] with
        last_only). With a cache, the tokens follow the `start` tokens it holds and are stored in it; without one,
        start must be 0 and the T tokens attend only to each other. Ids are not range-checked here (Model.forward
        does). adapter: the LoRA pool slot every row uses (-1: none), of lora_slots."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        batch, n = len(tokens), len(tokens[0]) if tokens else 0
        if batch == 0 or n == 0 or any(len(row) != n for row in tokens):
            raise ValueError(f"tokens must be a non-empty [batch, T] rectangle, got {batch} rows of lengths "
                             f"{sorted({len(row) for row in tokens})}")
        if cache is None:
            if start:
                raise ValueError("forward without a cache starts at position 0")
            cache = self.new_cache(batch, n)
        cache.check_room(start, n)
        if cache.batch != batch:
            raise ValueError(f"tokens have batch {batch}, the cache {cache.batch}")
        logits = (n - 1,) if last_only else tuple(range(n))
        plan = StepPlan(cache.paged.block_size, tuple(
            ChunkPlan(b, start, tuple(row), tuple(seq.blocks), logits, adapter=adapter)
            for b, (seq, row) in enumerate(zip(cache.sequences, tokens, strict=True))))
        step = ForwardBatch.build(plan, cache.paged.num_blocks, self.device, self.config.context_length, lora_slots)
        out = self.forward(step, cache.paged)
        cache.advance(n)
        return out.view(batch, 1 if last_only else n, -1)


def _check_triton_device(device: torch.device, dtype: torch.dtype) -> None:
    from realm.kernels.qdecode import INTERPRETED

    if device.type == "cpu" and not INTERPRETED:
        raise ValueError("the triton backend on CPU runs Triton's interpreter: set TRITON_INTERPRET=1 before "
                         "Triton is imported (realm's CLI does this for --backend triton --device cpu), or use "
                         "a CUDA device")
    if device.type == "cpu" and dtype == torch.bfloat16:
        raise ValueError("the triton backend cannot run bfloat16 on CPU: Triton's interpreter computes bfloat16 "
                         "tl.dot wrongly; use float32 or float16 there (bfloat16 runs on CUDA)")
