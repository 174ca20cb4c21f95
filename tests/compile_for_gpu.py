"""Compiles realm's Triton kernels for an NVIDIA target without a GPU (Triton's compiler runs on any machine), so
that code the CPU interpreter accepts but the GPU compiler would reject fails in CI too.

Run as a script in a process without TRITON_INTERPRET (the interpreter replaces kernels by Python functions):
    python tests/compile_for_gpu.py [--arch 90] FORMAT:KIND:DTYPE ... LAYER_KIND:DTYPE ...
KIND is decode1 (1-row CUDA-core path), decode16 (16-row tl.dot path), prefill or dequantize, or decode1_lora,
decode16_lora, prefill_lora (the matmul kernels with the fused multi-LoRA epilogue, at rank LORA_RANK); LAYER_KIND is
one of the per-layer kernels (rms_norm, rms_norm_residual, rope, silu_mul), attention kernels (store_kv, flash,
flash_causal, flash_paged, flash_paged_causal, paged_decode, paged_decode_split, paged_decode_combine, paged_verify,
paged_verify_split) or the unfused LoRA kernels (lora_shrink, lora_expand), which take no weight format; attention
kernels compile at head dims 64 and 128 in one case (paged_verify at its largest tile, with its launch's warps).
Prints one line per case (shared memory; registers and spill stack when cuobjdump is there) and exits 1 if any case
failed to compile.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from realm.kernels.checks import next_power_of_2
from realm.kernels.qdecode import dot_precision, weight_args
from realm.quant import FORMATS, QTensor

qmatmul_module = importlib.import_module("realm.kernels.qmatmul")
dequantize_module = importlib.import_module("realm.kernels.dequantize")
rms_norm_module = importlib.import_module("realm.kernels.rms_norm")
rope_module = importlib.import_module("realm.kernels.rope")
silu_mul_module = importlib.import_module("realm.kernels.silu_mul")
flash_module = importlib.import_module("realm.kernels.flash_attention")
paged_module = importlib.import_module("realm.kernels.paged_attention")
verify_module = importlib.import_module("realm.kernels.verify_attention")
store_kv_module = importlib.import_module("realm.kernels.store_kv")
lora_module = importlib.import_module("realm.kernels.lora")
POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                 torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _compile(kernel, tensors: dict, constexprs: dict, arch: int, fp_fusion: bool = True, scalars: dict | None = None,
             num_warps: int = 4, num_stages: int = 2):
    """Compiles kernel with tensors as pointers, constexprs as given, scalars with their given types ("fp32") and
    every other argument as an int32."""
    scalars = scalars or {}
    signature = {name: "*" + POINTER_TYPES[tensors[name].dtype] if name in tensors else
                 "constexpr" if name in constexprs else scalars.get(name, "i32") for name in kernel.arg_names}
    fixed = {(kernel.arg_names.index(name),): value for name, value in constexprs.items()}
    src = ASTSource(fn=kernel, signature=signature, constexprs=fixed)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps,
                                                                                 "num_stages": num_stages,
                                                                                 "enable_fp_fusion": fp_fusion})


def compile_case(fmt_name: str, kind: str, dtype: torch.dtype, arch: int):
    fmt = FORMATS[fmt_name]
    k = 512
    w = QTensor(torch.zeros(64, fmt.row_bytes(k), dtype=torch.uint8), fmt, (64, k)).planes()
    lora = kind.endswith("_lora")
    kind = kind.removesuffix("_lora")
    block_k = 64 if kind == "prefill" else 256
    args = weight_args(w, block_k)
    tensors = {name: v for name, v in args.items() if isinstance(v, torch.Tensor)}
    constexprs = {name: v for name, v in args.items() if not isinstance(v, torch.Tensor)}
    precision = dot_precision(dtype)
    if kind == "dequantize":
        tensors["out_ptr"] = torch.empty(1, dtype=torch.float32)
        return _compile(dequantize_module._dequantize_kernel, tensors,
                        {**constexprs, "BLOCK_N": 16, "BLOCK_K": block_k}, arch, fp_fusion=False)
    tensors.update(out_ptr=torch.empty(1, dtype=dtype), x_ptr=torch.empty(1, dtype=dtype))
    if kind == "prefill":
        block_m, block_n = 64, 64
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, DOT_PRECISION=precision)
        kernel = qmatmul_module._qmatmul_prefill_lora_kernel if lora else qmatmul_module._qmatmul_prefill_kernel
    else:
        block_m, block_n = {"decode1": 1, "decode16": 16}[kind], 32
        constexprs.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=block_m >= 16,
                          DOT_PRECISION=precision)
        kernel = qmatmul_module._qmatmul_decode_lora_kernel if lora else qmatmul_module._qmatmul_decode_kernel
    if lora:  # the launchers pass use_dot = block_m >= 16 (decode) and True (prefill)
        lora_tensors, lora_constexprs = _lora_epilogue_args(dtype, block_m, block_n, block_m >= 16)
        tensors.update(lora_tensors)
        constexprs.update(lora_constexprs)
    return _compile(kernel, tensors, constexprs, arch)


LORA_RANK = 32  # lora_delta's rank: one MAX_BLOCK_R tile on the tensor-core path
CUDA = torch.device("cuda")  # only its type is read (gather_chunk's budget on a GPU); no GPU needed


def _lora_epilogue_args(dtype: torch.dtype, block_m: int, block_n: int, use_dot: bool) -> tuple[dict, dict]:
    """The pointer arguments and constexprs of a kernel calling lora_delta on [block_m, block_n] tiles, as
    LoraEpilogue.kernel_args gives them on a GPU for rank LORA_RANK (lora_b in the compute dtype)."""
    tensors = dict(lora_t=torch.empty(1, dtype=torch.float32), lora_b=torch.empty(1, dtype=dtype),
                   lora_scale=torch.empty(1, dtype=torch.float32), lora_idx=torch.empty(1, dtype=torch.int32))
    constexprs = dict(LORA_BLOCK_R=min(lora_module.MAX_BLOCK_R, max(16, next_power_of_2(LORA_RANK))),
                      LORA_GATHER_R=lora_module.gather_chunk(block_m * block_n, LORA_RANK, CUDA),
                      LORA_DOT=use_dot and block_m >= 16 and block_n >= 16)
    return tensors, constexprs


def compile_lora_case(kind: str, dtype: torch.dtype, arch: int):
    """The unfused LoRA kernels with x, a, b and y in dtype, at their launchers' GPU tiles for rank LORA_RANK. Each
    holds both paths (one adapter per tile on tensor cores, per-row gather on CUDA cores), chosen at run time."""
    act, idx, f32 = torch.empty(1, dtype=dtype), torch.empty(1, dtype=torch.int32), torch.empty(1, dtype=torch.float32)
    block_m = lora_module.BLOCK_M
    if kind == "lora_shrink":
        block_r = min(lora_module.MAX_BLOCK_R, max(16, next_power_of_2(LORA_RANK)))
        constexprs = dict(BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=lora_module.SHRINK_BLOCK_K,
                          GATHER_K=lora_module.gather_chunk(block_m * block_r, lora_module.SHRINK_BLOCK_K, CUDA),
                          DOT_PRECISION=dot_precision(dtype))
        return _compile(lora_module._lora_shrink_kernel, dict(out_ptr=f32, x_ptr=act, a_ptr=act, idx_ptr=idx),
                        constexprs, arch)
    block_n = 64  # _launch_expand's block_n on a GPU
    tensors, constexprs = _lora_epilogue_args(dtype, block_m, block_n, True)
    return _compile(lora_module._lora_expand_kernel, {**tensors, "y_ptr": act},
                    {**constexprs, "BLOCK_M": block_m, "BLOCK_N": block_n}, arch)


LAYER_KINDS = ("rms_norm", "rms_norm_residual", "rope", "silu_mul", "gelu_tanh_mul")
LORA_KINDS = ("lora_shrink", "lora_expand")
ATTENTION_KINDS = ("store_kv", "flash", "flash_causal", "flash_paged", "flash_paged_causal", "paged_decode",
                   "paged_decode_split", "paged_decode_combine", "paged_verify", "paged_verify_split",
                   "flash_causal_window", "flash_paged_causal_window", "flash_paged_causal_window_softcap",
                   "paged_decode_softcap", "paged_verify_softcap")
HEAD_DIMS = (64, 128)
ATTENTION_SCALARS = {"qk_scale": "fp32", "softcap2": "fp32"}  # float arguments; the rest are int32


def compile_layer_case(kind: str, dtype: torch.dtype, arch: int):
    """A per-layer kernel with activations in dtype, at the block sizes of a SmolLM2-135M-like layer."""
    act = torch.empty(1, dtype=dtype)
    if kind in ("rms_norm", "rms_norm_residual"):
        tensors = dict(y_ptr=act, h_ptr=act, x_ptr=act, r_ptr=act, w_ptr=act)
        return _compile(rms_norm_module._rms_norm_kernel, tensors,
                        {"BLOCK": 1024, "HAS_RESIDUAL": kind == "rms_norm_residual"}, arch, scalars={"eps": "fp32"})
    if kind == "rope":
        tensors = dict(q_ptr=act, k_ptr=act, pos_ptr=torch.empty(1, dtype=torch.int64),
                       cos_sin_ptr=torch.empty(1, dtype=torch.float32))
        return _compile(rope_module._rope_kernel, tensors, {"BLOCK_QH": 16, "BLOCK_KH": 4, "BLOCK_D": 32}, arch,
                        fp_fusion=False)
    if kind in ("silu_mul", "gelu_tanh_mul"):
        return _compile(silu_mul_module._silu_mul_kernel, dict(out_ptr=act, gu_ptr=act),
                        {"BLOCK": 1024, "GELU": kind == "gelu_tanh_mul"}, arch)
    if kind in ATTENTION_KINDS:
        return [compile_attention_case(kind, dtype, head_dim, arch) for head_dim in HEAD_DIMS][-1]
    if kind in LORA_KINDS:
        return compile_lora_case(kind, dtype, arch)
    raise ValueError(f"unknown layer kernel {kind!r}; one of {LAYER_KINDS + ATTENTION_KINDS + LORA_KINDS}")


def compile_attention_case(kind: str, dtype: torch.dtype, head_dim: int, arch: int):
    """An attention kernel with its launcher's default tiles, 16-row GQA groups and 16-token pages."""
    act, idx, f32 = torch.empty(1, dtype=dtype), torch.empty(1, dtype=torch.int32), torch.empty(1, dtype=torch.float32)
    if kind == "store_kv":
        tensors = dict(k_cache_ptr=act, v_cache_ptr=act, k_ptr=act, v_ptr=act, slot_ptr=idx)
        return _compile(store_kv_module._store_kv_kernel, tensors, {"BLOCK_H": 8, "BLOCK_D": head_dim}, arch)
    if kind.startswith("flash"):
        cfg = flash_module.default_config(head_dim, dtype)
        paged = "paged" in kind
        tensors = dict(out_ptr=act, q_ptr=act, k_ptr=act, v_ptr=act, cu_q_ptr=idx, k_index_ptr=idx,
                       block_table_ptr=idx)
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_dim,
                          CAUSAL="causal" in kind, PAGED=paged, PAGE_SIZE=16 if paged else 1,
                          DOT_PRECISION=dot_precision(dtype), WINDOWED="window" in kind, SOFTCAP="softcap" in kind)
        return _compile(flash_module._flash_attention_kernel, tensors, constexprs, arch, scalars=ATTENTION_SCALARS)
    if kind == "paged_decode_combine":
        return _compile(paged_module._combine_kernel, dict(out_ptr=act, part_o_ptr=f32, part_lse_ptr=f32),
                        {"BLOCK_S": 32, "BLOCK_D": head_dim}, arch)
    if kind.startswith("paged_verify"):  # the largest tile (the most registers) with default_config's launch
        split = kind == "paged_verify_split"
        block_m = verify_module.max_block_m(head_dim, dtype)
        cfg = verify_module.default_config(block_m, head_dim, dtype)
        tensors = dict(out_ptr=act, part_o_ptr=f32 if split else act, part_lse_ptr=f32 if split else act, q_ptr=act,
                       k_cache_ptr=act, v_cache_ptr=act, cu_q_ptr=idx, seq_lens_ptr=idx, block_table_ptr=idx)
        constexprs = dict(BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_D=head_dim, SPLIT=split,
                          DOT_PRECISION=dot_precision(dtype), SOFTCAP="softcap" in kind)
        return _compile(verify_module._paged_verify_kernel, tensors, constexprs, arch, scalars=ATTENTION_SCALARS,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    split = kind == "paged_decode_split"
    tensors = dict(out_ptr=act, part_o_ptr=f32 if split else act, part_lse_ptr=f32 if split else act, q_ptr=act,
                   k_cache_ptr=act, v_cache_ptr=act, seq_lens_ptr=idx, block_table_ptr=idx)
    constexprs = dict(BLOCK_M=16, BLOCK_N=paged_module.PagedDecodeConfig().block_n, BLOCK_D=head_dim, SPLIT=split,
                      DOT_PRECISION=dot_precision(dtype), SOFTCAP="softcap" in kind)
    return _compile(paged_module._paged_decode_kernel, tensors, constexprs, arch, scalars=ATTENTION_SCALARS)


def resources(compiled) -> str:
    """Registers and spill stack (bytes per thread; Triton's kernels keep no arrays in local memory, so a stack is
    spilled registers) of a compiled kernel, from `cuobjdump -res-usage` on its cubin (Triton ships cuobjdump): ""
    when that fails."""
    try:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
        regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    except Exception:
        return ""
    return f", {regs} registers, {stack} bytes spilled"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100, 80 for A100")
    p.add_argument("cases", nargs="+", help="FORMAT:KIND:DTYPE or LAYER_KIND:DTYPE")
    args = p.parse_args(argv)
    failed = 0
    for case in args.cases:
        parts = case.split(":")
        try:
            if len(parts) == 2:
                compiled = compile_layer_case(parts[0], DTYPES[parts[1]], args.arch)
            else:
                fmt_name, kind, dtype = parts
                compiled = compile_case(fmt_name, kind, DTYPES[dtype], args.arch)
            print(f"ok {case}: {compiled.metadata.shared} bytes shared memory{resources(compiled)}")
        except Exception as exc:
            failed += 1
            print(f"FAILED {case}: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
