"""The paged KV cache (blocks, free list, per-sequence block lists) and ForwardBatch (packing ragged chunks with
their cache addresses), and the torch reference forward on ragged batches."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_llama
from tolerances import assert_same_predictions

from realm.runtime import CacheFullError, ForwardBatch, KVCache, Logits, PagedKVCache, SequenceKV, load_weights
from realm.runtime.runner import indexed_device
from realm.runtime.torch_model import TorchModel


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, context_length=64)
    return TorchModel(load_weights(path))


def cache_for(model, num_blocks=12, block_size=4) -> PagedKVCache:
    return PagedKVCache.allocate(model.config, num_blocks, block_size, model.dtype, model.device)


# ------------------------------------------------------------------------------------------------------ the cache


def test_paged_cache_layout_and_blocks(tiny_torch):
    c = tiny_torch.config
    cache = cache_for(tiny_torch, num_blocks=5, block_size=4)
    assert cache.k.shape == (c.n_layers, 5, 4, c.n_kv_heads, c.head_dim) and cache.v.shape == cache.k.shape
    assert cache.layer(1)[0].shape == (5, 4, c.n_kv_heads, c.head_dim)
    assert cache.nbytes == 2 * cache.k.numel() * 4
    a, b = SequenceKV(), SequenceKV()
    cache.reserve(a, 9)  # 3 blocks
    assert len(a.blocks) == 3 and cache.blocks.num_free == 2
    cache.reserve(a, 12)  # still 3
    assert len(a.blocks) == 3
    with pytest.raises(CacheFullError, match="13 tokens need 4 more KV blocks of 4; 2 of 5 are free"):
        cache.reserve(b, 13)
    assert b.blocks == [] and cache.blocks.num_free == 2  # a refused reservation takes nothing
    cache.reserve(b, 8)
    assert set(a.blocks).isdisjoint(b.blocks) and sorted(a.blocks + b.blocks) == [0, 1, 2, 3, 4]
    cache.release(a)
    assert a.blocks == [] and a.length == 0 and cache.blocks.num_free == 3
    cache.reserve(b, 20)  # reuses a's blocks
    assert len(b.blocks) == 5 and cache.blocks.num_free == 0


def test_cache_full_message_counts_the_missing_blocks(tiny_torch):
    cache = cache_for(tiny_torch, num_blocks=2, block_size=4)
    with pytest.raises(CacheFullError, match="9 tokens need 3 more KV blocks of 4; 2 of 2 are free"):
        cache.reserve(SequenceKV(), 9)


def test_rectangular_cache_scatters_each_sequences_blocks(tiny_torch):
    cache = KVCache(tiny_torch.config, batch=3, capacity=10, dtype=torch.float32, device="cpu", block_size=4)
    assert [s.blocks for s in cache.sequences] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert cache.batch == 3 and cache.length == 0 and cache.capacity == 10
    with pytest.raises(ValueError, match="forward at position 2, but the cache holds 0 positions"):
        cache.check_room(2, 1)
    with pytest.raises(ValueError, match="0 cached \\+ 11 new tokens exceed the KV cache capacity 10"):
        cache.check_room(0, 11)
    with pytest.raises(ValueError, match="capacity 65 exceeds the model's context length 64"):
        KVCache(tiny_torch.config, 1, 65, torch.float32, "cpu")
    with pytest.raises(ValueError, match="batch, capacity and block_size must be >= 1, got 1, 8 and 0"):
        KVCache(tiny_torch.config, 1, 8, torch.float32, "cpu", block_size=0)


# ----------------------------------------------------------------------------------------------- ForwardBatch


def test_forward_batch_packs_ragged_chunks(tiny_torch):
    cache = cache_for(tiny_torch, num_blocks=12, block_size=4)
    fresh, decode, chunk = SequenceKV(), SequenceKV(), SequenceKV()
    cache.reserve(fresh, 5)
    cache.reserve(decode, 10)
    decode.length = 9
    cache.reserve(chunk, 7)
    chunk.length = 3
    batch = ForwardBatch.build(cache, [(fresh, [1, 2, 3, 4, 5]), (decode, [6]), (chunk, torch.tensor([7, 8, 9, 10]))],
                               "cpu")
    assert batch.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] and batch.tokens.dtype == torch.int64
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 9, 3, 4, 5, 6]
    bs = 4
    expected_slots = ([fresh.blocks[p // bs] * bs + p % bs for p in range(5)] + [decode.blocks[2] * bs + 1]
                      + [chunk.blocks[p // bs] * bs + p % bs for p in range(3, 7)])
    assert batch.slot_mapping.tolist() == expected_slots
    assert batch.cu_seqlens_q.tolist() == [0, 5, 6, 10] and batch.seq_lens.tolist() == [5, 10, 7]
    assert batch.block_tables.tolist() == [[*fresh.blocks, 0], decode.blocks, [*chunk.blocks, 0]]
    assert all(t.dtype == torch.int32 for t in (batch.positions, batch.slot_mapping, batch.cu_seqlens_q,
                                                batch.seq_lens, batch.block_tables))
    assert batch.logits_rows.tolist() == [4, 5, 9]
    assert (batch.max_seqlen_q, batch.max_seq_len, batch.is_decode, batch.is_fresh_prefill) == (5, 10, False, False)
    batch.advance()
    assert (fresh.length, decode.length, chunk.length) == (5, 10, 7)
    every = ForwardBatch.build(cache, [(decode, [1])], "cpu", Logits.ALL)
    assert every.is_decode and not every.is_fresh_prefill and every.logits_rows.tolist() == [0]


def test_forward_batch_modes(tiny_torch):
    cache = cache_for(tiny_torch)
    a, b = SequenceKV(), SequenceKV()
    cache.reserve(a, 3)
    cache.reserve(b, 1)
    batch = ForwardBatch.build(cache, [(a, [1, 2, 3]), (b, [4])], "cpu", logits="all")
    assert batch.is_fresh_prefill and not batch.is_decode and batch.logits_rows.tolist() == [0, 1, 2, 3]


def test_forward_batch_errors(tiny_torch):
    cache = cache_for(tiny_torch, num_blocks=4, block_size=4)
    a = SequenceKV()
    cache.reserve(a, 4)
    with pytest.raises(ValueError, match="at least one sequence"):
        ForwardBatch.build(cache, [], "cpu")
    with pytest.raises(ValueError, match="sequence 0 has no new tokens"):
        ForwardBatch.build(cache, [(a, [])], "cpu")
    with pytest.raises(ValueError, match="a sequence appears twice"):
        ForwardBatch.build(cache, [(a, [1]), (a, [2])], "cpu")
    with pytest.raises(ValueError, match="sequence 0 needs room for 5 tokens but holds 1 blocks of 4; reserve"):
        ForwardBatch.build(cache, [(a, [1, 2, 3, 4, 5])], "cpu")
    with pytest.raises(ValueError, match="sequence 1 has block id 9, not in \\[0, 4\\)"):
        ForwardBatch.build(cache, [(a, [1]), (SequenceKV(blocks=[9]), [2])], "cpu")
    with pytest.raises(ValueError, match="sequence 0: positions up to 4 exceed the context length 3"):
        ForwardBatch.build(cache, [(a, [1, 2, 3, 4])], "cpu", max_positions=3)
    with pytest.raises(ValueError, match="'first' is not a valid Logits"):
        ForwardBatch.build(cache, [(a, [1])], "cpu", logits="first")
    shared = SequenceKV(blocks=list(a.blocks))  # a block-manager bug: two sequences writing one block
    with pytest.raises(ValueError, match="two new tokens map to one cache slot"):
        ForwardBatch.build(cache, [(a, [1]), (shared, [2])], "cpu")


def test_runner_checks_the_step_against_the_model_and_cache(tiny_torch):
    cache = cache_for(tiny_torch, num_blocks=20, block_size=4)
    seq = SequenceKV()
    cache.reserve(seq, 65)
    batch = ForwardBatch.build(cache, [(seq, list(range(65)))], "cpu")  # no max_positions: built unchecked
    with pytest.raises(ValueError, match="a sequence reaches position 65, past the context length 64"):
        tiny_torch.forward(batch, cache)
    c = tiny_torch.config
    wide = torch.empty(c.n_layers, 20, 4, c.n_kv_heads + 1, c.head_dim)
    for wrong, message in ((PagedKVCache.allocate(c, 20, 4, torch.float16, "cpu"), r"the KV cache is torch\.float16"),
                           (PagedKVCache(wide, wide.clone()), "does not fit this model's 2 layers of 2 KV heads")):
        short = SequenceKV(blocks=[0])
        with pytest.raises(ValueError, match=message):
            tiny_torch.forward(ForwardBatch.build(wrong, [(short, [1])], "cpu"), wrong)


def test_cuda_devices_are_indexed():
    """Tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0"): runners keep indexed devices."""
    assert indexed_device("cpu") == torch.device("cpu")
    assert indexed_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    if torch.cuda.is_available():
        assert indexed_device("cuda") == torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------------------------------------ the reference, ragged


def test_torch_forward_on_a_ragged_batch_equals_each_sequence_alone(tiny_torch):
    """A fresh prompt, a decode step and a chunk after cached tokens in one batch give each sequence's own logits."""
    prompts = [[3, 17, 42, 8, 8, 0, 49], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
    alone = [tiny_torch.forward_tokens([p])[0] for p in prompts]  # [T, vocab] each
    cache = cache_for(tiny_torch, num_blocks=12, block_size=4)
    seqs = [SequenceKV() for _ in prompts]
    for s, p in zip(seqs, prompts, strict=True):
        cache.reserve(s, len(p))
    cached = {1: 9, 2: 2}  # tokens of each sequence stored by an earlier step
    early = [(seqs[i], prompts[i][:n]) for i, n in cached.items()]
    first = ForwardBatch.build(cache, early, "cpu")
    tiny_torch.forward(first, cache)
    first.advance()
    step = ForwardBatch.build(cache, [(seqs[0], prompts[0]), (seqs[1], prompts[1][9:]), (seqs[2], prompts[2][2:])],
                              "cpu", Logits.ALL)
    logits = tiny_torch.forward(step, cache)
    rows = logits.split(list(step.query_lens))
    assert_same_predictions(rows[0], alone[0])
    assert_same_predictions(rows[1], alone[1][9:])
    assert_same_predictions(rows[2], alone[2][2:])
