"""realm.kernels.store_kv (new K/V into their paged-cache slots) against its reference, on the `device` fixture
(Triton's interpreter on CPU, the same tests on CUDA). A copy: compared bit for bit, both caches whole, so slots the
kernel must not touch stay poisoned."""

import importlib

import pytest
import torch
from tolerances import assert_equal, poison

from realm.kernels.store_kv import store_kv, store_kv_ref

# the module itself: realm.kernels.store_kv is the function of the same name once realm.kernels has imported it
store_kv_module = importlib.import_module("realm.kernels.store_kv")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qkv(tokens, n_heads, kv_heads, head_dim, dtype, device, seed=0):
    """k, v as the runtime sees them: views into one fused [tokens, (n_heads + 2 * kv_heads) * head_dim] output."""
    g = torch.Generator().manual_seed(seed)
    q_size, kv_size = n_heads * head_dim, kv_heads * head_dim
    qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=g).to(device=device, dtype=dtype)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size :].view(tokens, kv_heads, head_dim)
    return k, v


def _caches(num_blocks, block_size, kv_heads, head_dim, dtype, device):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return (poison(torch.empty(shape, dtype=dtype, device=device)),
            poison(torch.empty(shape, dtype=dtype, device=device)))


def _slots(tokens, n_slots, device, seed=0):
    """Distinct slots in random order (tokens of several sequences land in scattered blocks)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_slots, generator=g)[:tokens].to(device=device, dtype=torch.int32)


def _check(k, v, k_cache, v_cache, slots, what=""):
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    assert store_kv(k, v, k_cache, v_cache, slots) is None
    assert_equal(k_cache, k_ref, what=f"k_cache {what}")
    assert_equal(v_cache, v_ref, what=f"v_cache {what}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("n_heads,kv_heads", [(4, 1), (9, 3), (32, 8)])  # MHA-like, SmolLM2-135M, Llama-3-8B
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_matches_reference(tokens, n_heads, kv_heads, head_dim, dtype, device):
    k, v = _qkv(tokens, n_heads, kv_heads, head_dim, dtype, device, seed=tokens)
    assert tokens == 1 or k.stride(0) == (n_heads + 2 * kv_heads) * head_dim  # strided views, read as they are
    k_cache, v_cache = _caches(12, 16, kv_heads, head_dim, dtype, device)
    _check(k, v, k_cache, v_cache, _slots(tokens, 12 * 16, device, seed=tokens),
           what=f"{tokens} tokens {kv_heads}x{head_dim} {dtype}")


def test_odd_block_size_and_head_dim_and_both_ends_of_the_cache(device):
    k, v = _qkv(5, 6, 3, 80, torch.float16, device, seed=1)
    k_cache, v_cache = _caches(4, 5, 3, 80, torch.float16, device)
    _check(k, v, k_cache, v_cache, torch.tensor([19, 0, 7, 5, 4], dtype=torch.int32, device=device))


def test_wide_tokens_take_several_programs(device, monkeypatch):
    """Tokens wider than one program's tile split their heads over programs."""
    monkeypatch.setattr(store_kv_module, "MAX_TILE", 128)  # 2 heads of 64 per program: heads 0-1, 2-3, 4
    k, v = _qkv(3, 5, 5, 64, torch.float32, device, seed=2)
    k_cache, v_cache = _caches(2, 16, 5, 64, torch.float32, device)
    _check(k, v, k_cache, v_cache, torch.tensor([3, 31, 16], dtype=torch.int32, device=device))


def test_contiguous_inputs_and_no_tokens(device):
    k_cache, v_cache = _caches(3, 16, 2, 64, torch.float32, device)
    k, v = torch.randn(4, 2, 64, device=device), torch.randn(4, 2, 64, device=device)
    _check(k, v, k_cache, v_cache, torch.tensor([47, 0, 20, 21], dtype=torch.int32, device=device))
    before = k_cache.clone()
    none = torch.empty(0, dtype=torch.int32, device=device)
    store_kv(k[:0], v[:0], k_cache, v_cache, none)
    assert_equal(k_cache, before)


def test_out_of_range_slots_are_not_written(device):
    """What the kernel does where the host does not check slots (CUDA): such tokens write nothing, the others are
    stored. (`_launch` skips the CPU check to show this here.)"""
    k, v = _qkv(4, 4, 2, 64, torch.float16, device, seed=3)
    k_cache, v_cache = _caches(2, 16, 2, 64, torch.float16, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k[[0, 2]], v[[0, 2]], k_ref, v_ref, torch.tensor([5, 31], dtype=torch.int32, device=device))
    store_kv_module._launch(k, v, k_cache, v_cache, torch.tensor([5, 32, 31, -1], dtype=torch.int32, device=device))
    assert_equal(k_cache, k_ref)
    assert_equal(v_cache, v_ref)


def test_rejects_bad_inputs(device):
    k, v = _qkv(3, 4, 2, 64, torch.float16, device)
    k_cache, v_cache = _caches(4, 16, 2, 64, torch.float16, device)
    slots = torch.tensor([0, 17, 63], dtype=torch.int32, device=device)
    other = "meta" if device.type == "cpu" else "cpu"
    cases = [
        (dict(k=k.double()), "k must be float16, bfloat16 or float32"),
        (dict(v=v[0]), r"v must be 3-D \[tokens, kv_heads, head_dim\]"),
        (dict(k=k.transpose(1, 2)), "k must be contiguous along head_dim"),
        (dict(v=v[:2]), r"k \[3, 2, 64\] and v \[2, 2, 64\] must have one shape"),
        (dict(k=k.float(), v=v.float()), r"k and v \(torch.float32, torch.float32\) must have the KV cache's dtype"),
        (dict(v=v.bfloat16()), "must have the KV cache's dtype torch.float16"),
        (dict(k=k[:, :1], v=v[:, :1]), "k and v have 1 heads of 64; the KV cache holds 2 heads of 64"),
        (dict(k=k[..., :32], v=v[..., :32]), "k and v have 2 heads of 32; the KV cache holds 2 heads of 64"),
        (dict(k_cache=k_cache[0]), r"k_cache must be \[num_blocks, block_size, kv_heads, head_dim\]"),
        (dict(v_cache=v_cache[:2]), "k_cache .* and v_cache .* must match"),
        (dict(v_cache=v_cache[..., :32]), "v_cache must be contiguous"),
        (dict(slot_mapping=slots.long()), "slot_mapping must be int32"),
        (dict(slot_mapping=slots[:2]), r"slot_mapping must be \[3\]"),
        (dict(slot_mapping=slots[None]), r"slot_mapping must have 1 dimension"),
        (dict(slot_mapping=slots.to(other)), "slot_mapping is on"),
        (dict(k_cache=k_cache.to(other), v_cache=v_cache.to(other)), "store_kv: tensors are on different devices"),
    ]
    if device.type == "cpu":  # slots are checked on the host only for CPU tensors (see realm.kernels.store_kv)
        cases += [
            (dict(slot_mapping=torch.tensor([0, 64, 65], dtype=torch.int32)),
             r"slot_mapping\[1\] = 64 is not a slot in \[0, 64\) \(4 blocks of 16\)"),
            (dict(slot_mapping=torch.tensor([0, 1, -1], dtype=torch.int32)), r"slot_mapping\[2\] = -1 is not a slot"),
        ]
    for change, message in cases:
        args = dict(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slots) | change
        with pytest.raises(ValueError, match=message):
            store_kv(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_model_sizes(dtype, device):
    """A 4096-token prefill of Llama-3-8B's KV (8 heads of 128) into a 16-token-block cache."""
    k, v = _qkv(4096, 32, 8, 128, dtype, device, seed=4)
    k_cache, v_cache = _caches(1024, 16, 8, 128, dtype, device)
    _check(k, v, k_cache, v_cache, _slots(4096, 1024 * 16, device, seed=4))
