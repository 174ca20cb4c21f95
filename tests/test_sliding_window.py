"""Sliding-window attention (Mistral, Phi-3, Gemma's local layers) and soft-capped scores (Gemma 2): every attention
kernel with a window against its reference, each reference against one plain masked softmax, and the cases where a
window changes which key blocks, tiles or splits a program visits: windows of 1, shorter than a tile, spanning
splits, and longer than the sequence. Query i of a sequence sees the keys j with position(i) - window < j <=
position(i); a softcap c turns each scaled score x into c * tanh(x / c)."""

from __future__ import annotations

import pytest
import torch
from test_verify_attention import _case, _cu, _paged, _query
from tolerances import assert_close, poison

from realm.kernels.flash_attention import (
    AttentionConfig,
    flash_attention,
    flash_attention_paged,
    flash_attention_paged_ref,
    flash_attention_ref,
)
from realm.kernels.paged import gather_kv
from realm.kernels.paged_attention import PagedDecodeConfig, paged_decode_attention, paged_decode_attention_ref
from realm.kernels.verify_attention import paged_verify_attention, paged_verify_attention_ref

WINDOWS = [1, 5, 16, 37, 1000]  # one key; inside a tile; a tile; across tiles and splits; longer than any sequence
SMALL_TILES = PagedDecodeConfig(block_n=16)
FLASH_TILES = AttentionConfig(block_m=16, block_n=16)
LENS_Q, LENS_K = [1, 3, 4, 20], [70, 9, 41, 50]  # the queries are the LAST len_q of each sequence's len_k keys


def plain(q, keys, values, cu_q, window, scale, softcap=None):
    """One masked softmax per sequence, float64: the definition the references must agree with."""
    out = torch.empty(q.shape, dtype=torch.float64)
    offsets = cu_q.tolist()
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        qs = q[offsets[b] : offsets[b + 1]].double()
        group = qs.shape[1] // k.shape[1]
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
        pos = torch.arange(qs.shape[0])[:, None] + k.shape[0] - qs.shape[0]
        j = torch.arange(k.shape[0])[None, :]
        s = torch.einsum("ihd,jhd->hij", qs, k) * scale
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~((j <= pos) & (j > pos - window)), float("-inf"))
        out[offsets[b] : offsets[b + 1]] = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v)
    return out


@pytest.mark.parametrize("window", WINDOWS)
def test_references_agree_with_a_plain_masked_softmax(window):
    q, k_cache, v_cache, cu, seq_lens, table = _case(LENS_Q, LENS_K, 6, 2, 32, torch.float32, "cpu")
    keys, values = gather_kv(k_cache, table, seq_lens), gather_kv(v_cache, table, seq_lens)
    expected = plain(q, keys, values, cu, window, 32**-0.5)
    got = paged_verify_attention_ref(q, k_cache, v_cache, cu, seq_lens, table, window=window)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    got = flash_attention_paged_ref(q, k_cache, v_cache, cu, seq_lens, table, window=window)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    last = cu[1:] - 1  # each sequence's last query is a decode of it
    got = paged_decode_attention_ref(q[last], k_cache, v_cache, seq_lens, table, window=window)
    torch.testing.assert_close(got.double(), expected[last], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", WINDOWS)
def test_decode(window, num_splits, dtype):
    k_cache, v_cache, seq_lens, table = _paged(LENS_K, 16, 2, 32, dtype, "cpu")
    q = _query(len(LENS_K), 6, 32, dtype, "cpu")
    out = poison(torch.empty(q.shape, dtype=dtype))
    y = paged_decode_attention(q, k_cache, v_cache, seq_lens, table, num_splits=num_splits, config=SMALL_TILES,
                               out=out, window=window)
    expected = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), seq_lens, table, window=window)
    magnitude = paged_decode_attention_ref(q.double(), k_cache.double(), v_cache.double().abs(), seq_lens, table,
                                           window=window)  # P @ |V|: the scale of the rounding error
    assert_close(y, expected, magnitude=magnitude, what=f"window {window} splits {num_splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", WINDOWS)
def test_verify(window, num_splits, dtype):
    q, k_cache, v_cache, cu, seq_lens, table = _case([1, 2, 4, 3], LENS_K, 6, 2, 32, dtype, "cpu")
    out = poison(torch.empty(q.shape, dtype=dtype))
    y = paged_verify_attention(q, k_cache, v_cache, cu, seq_lens, table, num_splits=num_splits, config=SMALL_TILES,
                               out=out, window=window)
    expected = paged_verify_attention_ref(q.float(), k_cache.float(), v_cache.float(), cu, seq_lens, table,
                                          window=window)
    magnitude = paged_verify_attention_ref(q.double(), k_cache.double(), v_cache.double().abs(), cu, seq_lens, table,
                                           window=window)
    assert_close(y, expected, magnitude=magnitude, what=f"window {window} splits {num_splits}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("window", WINDOWS)
def test_flash_paged_and_contiguous(window, dtype):
    q, k_cache, v_cache, cu, seq_lens, table = _case(LENS_Q, LENS_K, 6, 2, 32, dtype, "cpu")
    y = flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table, window=window, config=FLASH_TILES)
    expected = flash_attention_paged_ref(q.float(), k_cache.float(), v_cache.float(), cu, seq_lens, table,
                                         window=window)
    magnitude = flash_attention_paged_ref(q.double(), k_cache.double(), v_cache.double().abs(), cu, seq_lens, table,
                                          window=window)
    assert_close(y, expected, magnitude=magnitude, what=f"paged, window {window}")
    # a fresh prefill: queries are their own keys
    lens = [1, 9, 33]
    k, v = (_query(sum(lens), 2, 32, dtype, "cpu", seed=s) for s in (3, 4))
    qf = _query(sum(lens), 6, 32, dtype, "cpu", seed=5)
    cu = _cu(lens, "cpu")
    y = flash_attention(qf, k, v, cu, cu, window=window, config=FLASH_TILES)
    expected = flash_attention_ref(qf.float(), k.float(), v.float(), cu, cu, window=window)
    magnitude = flash_attention_ref(qf.double(), k.double(), v.double().abs(), cu, cu, window=window)
    assert_close(y, expected, magnitude=magnitude, what=f"contiguous, window {window}")


def test_a_window_changes_the_result_and_bad_windows_are_refused():
    q, k_cache, v_cache, cu, seq_lens, table = _case(LENS_Q, LENS_K, 6, 2, 32, torch.float32, "cpu")
    full = flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table)
    windowed = flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table, window=5)
    assert (full - windowed).abs().max() > 0.1
    assert torch.equal(flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table, window=1000), full)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table, window=bad)
        with pytest.raises(ValueError, match="window must be None or an int >= 1"):
            paged_decode_attention(q[:4], k_cache, v_cache, seq_lens, table, window=bad)
    with pytest.raises(ValueError, match="a sliding window needs causal attention"):
        flash_attention(q, q[:, :2], q[:, :2], cu, cu, causal=False, window=4)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_softcapped_scores_in_every_kernel(num_splits, window):
    """A cap of 2 (scores of standard deviation ~3 here: most are capped) in decode, verify and flash, against their
    references, and the references against the plain softmax with the cap."""
    cap = 2.0
    q, k_cache, v_cache, cu, seq_lens, table = _case([1, 2, 4, 3], LENS_K, 6, 2, 32, torch.float32, "cpu")
    keys, values = gather_kv(k_cache, table, seq_lens), gather_kv(v_cache, table, seq_lens)
    expected = plain(q, keys, values, cu, window or 10**6, 32**-0.5, cap)
    got = paged_verify_attention_ref(q, k_cache, v_cache, cu, seq_lens, table, window=window, softcap=cap)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    y = paged_verify_attention(q, k_cache, v_cache, cu, seq_lens, table, num_splits=num_splits, config=SMALL_TILES,
                               window=window, softcap=cap)
    assert_close(y, got, what="verify")
    y = flash_attention_paged(q, k_cache, v_cache, cu, seq_lens, table, window=window, softcap=cap, config=FLASH_TILES)
    assert_close(y, flash_attention_paged_ref(q, k_cache, v_cache, cu, seq_lens, table, window=window, softcap=cap),
                 what="flash")
    last = cu[1:] - 1
    ref = paged_decode_attention_ref(q[last], k_cache, v_cache, seq_lens, table, window=window, softcap=cap)
    torch.testing.assert_close(ref.double(), expected[last], rtol=1e-5, atol=1e-5)
    y = paged_decode_attention(q[last], k_cache, v_cache, seq_lens, table, num_splits=num_splits, config=SMALL_TILES,
                               window=window, softcap=cap)
    assert_close(y, ref, what="decode")
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="softcap must be None or a finite number > 0"):
            paged_decode_attention(q[last], k_cache, v_cache, seq_lens, table, softcap=bad)
