"""realm.kernels: Triton kernels, each next to its torch reference.

    qmatmul(x, w)          # x [..., K] @ w.T for a QTensor w [N, K] of any realm.quant format
    qmatmul_ref(x, w)      # the reference: dequantize, matmul in float32
    dequantize(w)          # the kernels' in-register decode, materialised (bit-exact with realm.quant)
    rms_norm(x, weight, eps, residual=None)   # RMSNorm, optionally fused with the residual add: y or (y, x + residual)
    apply_rope(q, k, positions, cos_sin)      # rotate-half rope in place; cos_sin = rope_cache(head_dim, n, theta, dev)
    silu_mul(gate_up)      # silu(gate) * up from the fused [tokens, 2 * ffn] gate/up projection
    gelu_tanh_mul(gate_up) # GELU-tanh(gate) * up (Gemma)
    store_kv(k, v, k_cache, v_cache, slot_mapping)            # new K/V into their pages (layout: paged.py)
    flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k)      # varlen prefill, GQA; queries end their sequence
    flash_attention_paged(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_table)   # ... keys from the pages
    paged_decode_attention(q, k_cache, v_cache, seq_lens, block_table)                # one query per sequence, split-K
    plan_qmatmul(m, w)     # which kernel and tiles qmatmul runs; autotune(x, w) measures and records the best
    realm.kernels.cpu_attention.paged_attention_cpu(...)   # the onednn backend's: a C kernel for decode/verify chunks
    realm.kernels.cpu_linear.linear_panels(x, panels, n)   # the onednn backend's: a C kernel for steps of few rows
    lora_shrink(x, a, indices)                    # multi-LoRA, one adapter slot per token row: t = x @ a[idx].T
    lora_expand(y, t, b, scale, indices)          # y += scale[idx] * t @ b[idx].T in place (the unfused path)
    qmatmul(x, w, lora=LoraEpilogue(t, b, scale, indices))   # ... the expand in qmatmul's epilogue
"""

from . import tuning
from .dequantize import dequantize, dequantize_ref
from .flash_attention import (
    AttentionConfig,
    flash_attention,
    flash_attention_paged,
    flash_attention_paged_ref,
    flash_attention_ref,
)
from .lora import LoraEpilogue, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref
from .paged_attention import (
    PagedDecodeConfig,
    PagedDecodePlan,
    paged_decode_attention,
    paged_decode_attention_ref,
    plan_decode,
)
from .qmatmul import (
    DecodeConfig,
    Plan,
    PrefillConfig,
    Regime,
    autotune,
    candidate_configs,
    plan_qmatmul,
    qmatmul,
    qmatmul_lora_ref,
    qmatmul_ref,
)
from .rms_norm import rms_norm, rms_norm_ref
from .rope import apply_rope, apply_rope_ref, rope_cache
from .silu_mul import gelu_tanh_mul, gelu_tanh_mul_ref, silu_mul, silu_mul_ref
from .store_kv import store_kv, store_kv_ref

__all__ = [
    "AttentionConfig",
    "DecodeConfig",
    "LoraEpilogue",
    "PagedDecodeConfig",
    "PagedDecodePlan",
    "Plan",
    "PrefillConfig",
    "Regime",
    "apply_rope",
    "apply_rope_ref",
    "autotune",
    "candidate_configs",
    "dequantize",
    "dequantize_ref",
    "flash_attention",
    "flash_attention_paged",
    "flash_attention_paged_ref",
    "flash_attention_ref",
    "gelu_tanh_mul",
    "gelu_tanh_mul_ref",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "plan_decode",
    "plan_qmatmul",
    "qmatmul",
    "qmatmul_lora_ref",
    "qmatmul_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope_cache",
    "silu_mul",
    "silu_mul_ref",
    "store_kv",
    "store_kv_ref",
    "tuning",
]
