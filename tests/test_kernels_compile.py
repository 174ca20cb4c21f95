"""The kernels compile for an H100 (sm_90) on this machine, GPU or not: the interpreter runs the tests' kernels as
Python, which accepts code the GPU compiler rejects."""

import os
import subprocess
import sys
from pathlib import Path

from realm.quant import FORMATS

KINDS = ["decode1", "decode16", "prefill", "dequantize"]
DTYPES = ["float16", "bfloat16", "float32"]
# Every format once, cycling through the kernel kinds and activation dtypes so every kind meets every dtype.
CASES = [f"{name}:{KINDS[i % 4]}:{DTYPES[i % 3] if KINDS[i % 4] != 'dequantize' else 'float32'}"
         for i, name in enumerate(FORMATS)]
CASES += ["Q4_K:decode1:float16", "Q4_K:decode16:float16", "Q4_K:prefill:float16", "Q4_K:prefill:bfloat16"]
# The per-layer kernels (no weight format) in the half-precision dtypes a GPU runs them in.
CASES += [f"{kind}:{dtype}" for kind in ("rms_norm", "rms_norm_residual", "rope", "silu_mul", "gelu_tanh_mul")
          for dtype in ("float16", "bfloat16")]
# Attention (each case at head dims 64 and 128): every kernel variant in both half-precision dtypes, and float32
# (the exact path the CPU tests and the float32 model comparison use) for the ones the model runs.
ATTENTION = ("store_kv", "flash", "flash_causal", "flash_paged", "flash_paged_causal", "paged_decode",
             "paged_decode_split", "paged_decode_combine", "paged_verify", "paged_verify_split",
             "flash_causal_window", "flash_paged_causal_window", "flash_paged_causal_window_softcap",
             "paged_decode_softcap", "paged_verify_softcap")
CASES += [f"{kind}:{dtype}" for kind in ATTENTION for dtype in ("float16", "bfloat16")]
CASES += [f"{kind}:float32" for kind in ("flash_causal", "flash_paged_causal", "paged_decode", "paged_decode_split",
                                         "paged_verify", "paged_verify_split")]
# Multi-LoRA: the unfused shrink and expand (each holds its one-adapter tl.dot path and its per-row gather path, a
# run-time choice), and the matmul kernels with the fused LoRA epilogue: decode1 (gather only), decode16 and prefill
# (tl.dot possible) for a few formats.
CASES += [f"{kind}:{dtype}" for kind in ("lora_shrink", "lora_expand") for dtype in ("float16", "float32")]
CASES += ["Q4_K:decode1_lora:float16", "Q4_K:decode16_lora:float16", "Q8_0:decode16_lora:float16",
          "Q4_K:prefill_lora:float16", "Q6_K:prefill_lora:float16", "IQ4_XS:prefill_lora:float16"]


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_for_gpu.py")
    run = subprocess.run([sys.executable, str(script), *CASES], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == len(CASES), run.stdout
