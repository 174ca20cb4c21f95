"""The paged KV tensors, the step plan (plain data) and ForwardBatch (the plan packed into device tensors), the model
runner (plan -> forward -> sampled tokens), and the torch reference forward on ragged batches."""

from __future__ import annotations

import pickle

import pytest
import torch
from tiny_gguf import write_tiny_llama
from tolerances import assert_same_predictions

from realm.runtime import (
    ChunkPlan,
    ForwardBatch,
    KVCache,
    ModelRunner,
    PagedKVCache,
    RowSampling,
    StepPlan,
    load_weights,
)
from realm.runtime.torch_model import TorchModel
from realm.runtime.transformer import indexed_device


@pytest.fixture(scope="module")
def tiny_torch(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    write_tiny_llama(path, context_length=64)
    return TorchModel(load_weights(path))


def cache_for(model, num_blocks=12, block_size=4) -> PagedKVCache:
    return PagedKVCache.allocate(model.config, num_blocks, block_size, model.dtype, model.device)


def chunk(start, ids, blocks, logits=None, seq_id=0, sampling=None) -> ChunkPlan:
    """A chunk asking for its last token's logits unless told otherwise."""
    return ChunkPlan(seq_id, start, tuple(ids), tuple(blocks), (len(ids) - 1,) if logits is None else tuple(logits),
                     sampling)


# ------------------------------------------------------------------------------------------------------ the cache


def test_paged_cache_layout_and_copies(tiny_torch):
    c = tiny_torch.config
    cache = cache_for(tiny_torch, num_blocks=5, block_size=4)
    assert cache.k.shape == (c.n_layers, 5, 4, c.n_kv_heads, c.head_dim) and cache.v.shape == cache.k.shape
    assert cache.layer(1)[0].shape == (5, 4, c.n_kv_heads, c.head_dim)
    assert cache.nbytes == 2 * cache.k.numel() * 4 == 5 * PagedKVCache.bytes_per_block(c, 4, torch.float32)
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.copy_blocks([(1, 3), (4, 0)])
    for now, was in ((cache.k, before_k), (cache.v, before_v)):
        assert torch.equal(now[:, 3], was[:, 1]) and torch.equal(now[:, 0], was[:, 4])
        assert torch.equal(now[:, [1, 2, 4]], was[:, [1, 2, 4]])  # sources and the rest untouched, every layer
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 1, got 0"):
        PagedKVCache.allocate(c, 0, 4)


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


# ------------------------------------------------------------------------------------- the plan, ForwardBatch


def test_forward_batch_packs_ragged_chunks():
    fresh, decode, part = [3, 7], [0, 5, 9], [2, 11]  # block tables, scattered
    plan = StepPlan(4, (chunk(0, [1, 2, 3, 4, 5], fresh), chunk(9, [6], decode), chunk(3, [7, 8, 9, 10], part)))
    assert pickle.loads(pickle.dumps(plan)) == plan and plan.num_tokens == 10 and plan.num_logits == 3
    batch = ForwardBatch.build(plan, 12, "cpu")
    assert batch.tokens.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 9, 3, 4, 5, 6]
    expected_slots = ([fresh[p // 4] * 4 + p % 4 for p in range(5)] + [decode[2] * 4 + 1]
                      + [part[p // 4] * 4 + p % 4 for p in range(3, 7)])
    assert batch.slot_mapping.tolist() == expected_slots
    assert batch.cu_seqlens_q.tolist() == [0, 5, 6, 10] and batch.seq_lens.tolist() == [5, 10, 7]
    assert batch.block_tables.tolist() == [[*fresh, 0], decode, [*part, 0]]
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in (
        batch.tokens, batch.positions, batch.slot_mapping, batch.cu_seqlens_q, batch.seq_lens, batch.block_tables,
        batch.logits_rows))
    assert batch.logits_rows.tolist() == [4, 5, 9]
    assert (batch.max_seqlen_q, batch.max_seq_len, batch.num_decode, batch.is_fresh_prefill) == (5, 10, 0, False)
    # decodes first: the attention plan sends them to paged decode attention
    decodes_first = ForwardBatch.build(StepPlan(4, plan.chunks[1:2] + plan.chunks[::2]), 12, "cpu")
    assert decodes_first.num_decode == 1 and decodes_first.attention.chunk_cu_seqlens.tolist() == [0, 5, 9]


def test_logits_rows_are_any_subset_of_a_chunks_positions():
    plan = StepPlan(4, (chunk(0, [1, 2, 3, 4, 5], [0, 1], logits=(0, 2, 4)), chunk(2, [6, 7, 8], [2, 4], logits=()),
                        chunk(1, [9], [3], logits=(0,))))
    batch = ForwardBatch.build(plan, 6, "cpu")
    assert batch.logits_rows.tolist() == [0, 2, 4, 8] and batch.num_logits == 4
    fresh = ForwardBatch.build(StepPlan(4, (chunk(0, [1, 2, 3], [0], logits=range(3)),)), 4, "cpu")
    assert fresh.is_fresh_prefill and fresh.logits_rows.tolist() == [0, 1, 2]


def test_forward_batch_errors():
    blocks = [0]
    with pytest.raises(ValueError, match="at least one sequence"):
        ForwardBatch.build(StepPlan(4, ()), 4, "cpu")
    cases = [
        ((chunk(0, [], blocks, logits=()),), None, "sequence 0 has no new tokens"),
        ((chunk(0, [1, 2, 3, 4, 5], blocks),), None, "sequence 0 needs room for 5 tokens but holds 1 blocks of 4"),
        ((chunk(0, [1], blocks), chunk(0, [2], [9], seq_id=1)), None, "sequence 1 has block id 9, not in \\[0, 4\\)"),
        ((chunk(0, [1, 2, 3, 4], blocks),), 3, "sequence 0: positions up to 4 exceed the context length 3"),
        ((chunk(0, [1, 2], blocks, logits=(1, 0)),), None, r"logits offsets \(1, 0\) must increase within \[0, 2\)"),
        ((chunk(0, [1, 2], blocks, logits=(2,)),), None, r"logits offsets \(2,\) must increase"),
        # a block-manager bug: two sequences writing one block
        ((chunk(0, [1], blocks), chunk(0, [2], blocks, seq_id=1)), None, "two new tokens map to one cache slot"),
        ((chunk(0, [1, 2], blocks, logits=(), sampling=RowSampling()),), None,
         "sequence 0 asks for sampling but for no logits rows"),
    ]
    for chunks, max_positions, message in cases:
        with pytest.raises(ValueError, match=message):
            ForwardBatch.build(StepPlan(4, chunks), 4, "cpu", max_positions)


def test_the_forward_checks_the_step_against_the_model_and_cache(tiny_torch):
    cache = cache_for(tiny_torch, num_blocks=20, block_size=4)
    plan = StepPlan(4, (chunk(0, list(range(65)), range(17)),))
    batch = ForwardBatch.build(plan, 20, "cpu")  # no max_positions: built unchecked
    with pytest.raises(ValueError, match="a sequence reaches position 65, past the context length 64"):
        tiny_torch.forward(batch, cache)
    c = tiny_torch.config
    wide = torch.empty(c.n_layers, 20, 4, c.n_kv_heads + 1, c.head_dim)
    short = ForwardBatch.build(StepPlan(4, (chunk(0, [1], [0]),)), 20, "cpu")
    for wrong, message in ((PagedKVCache.allocate(c, 20, 4, torch.float16, "cpu"), r"the KV cache is torch\.float16"),
                           (PagedKVCache(wide, wide.clone()), "does not fit this model's 2 layers of 2 KV heads")):
        with pytest.raises(ValueError, match=message):
            tiny_torch.forward(short, wrong)


def test_cuda_devices_are_indexed():
    """Tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0"): runners keep indexed devices."""
    assert indexed_device("cpu") == torch.device("cpu")
    assert indexed_device(torch.device("cuda", 1)) == torch.device("cuda:1")
    if torch.cuda.is_available():
        assert indexed_device("cuda") == torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------------------------------------ the reference, ragged


PROMPTS = [[3, 17, 42, 8, 8, 0, 49], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]]
BLOCKS = [[5, 0], [1, 7, 3], [9, 2]]  # scattered, in no order


def test_torch_forward_on_a_ragged_batch_equals_each_sequence_alone(tiny_torch):
    """A fresh prompt, a decode step and a chunk after cached tokens in one batch give each sequence's own logits."""
    alone = [tiny_torch.forward_tokens([p])[0] for p in PROMPTS]  # [T, vocab] each
    cache = cache_for(tiny_torch, num_blocks=12, block_size=4)
    cached = {1: 9, 2: 2}  # tokens of each sequence stored by an earlier step
    first = StepPlan(4, tuple(chunk(0, PROMPTS[i][:n], BLOCKS[i]) for i, n in cached.items()))
    tiny_torch.forward(ForwardBatch.build(first, 12, "cpu"), cache)
    step = StepPlan(4, tuple(chunk(n, p[n:], b, logits=range(len(p) - n)) for p, b, n in zip(
        PROMPTS, BLOCKS, (0, 9, 2), strict=True)))
    batch = ForwardBatch.build(step, 12, "cpu")
    logits = tiny_torch.forward(batch, cache)
    rows = logits.split(list(batch.query_lens))
    assert_same_predictions(rows[0], alone[0])
    assert_same_predictions(rows[1], alone[1][9:])
    assert_same_predictions(rows[2], alone[2][2:])


# -------------------------------------------------------------------------------------------------- the runner


def test_runner_executes_a_plan(tiny_torch):
    """Greedy rows give the argmax of the rows' logits; a chunk without sampling gets no tokens; logits and the
    probabilities come back when asked; the block copies run before the forward."""
    runner = ModelRunner(tiny_torch, num_blocks=12, block_size=4, seed=0)
    assert runner.kv.num_blocks == 12 and "12 KV blocks of 4" in repr(runner)
    greedy, sampled = RowSampling(position=7), RowSampling(temperature=0.7, seed=3, position=5)
    plan = StepPlan(4, (chunk(0, PROMPTS[0], BLOCKS[0], sampling=greedy),
                        chunk(0, PROMPTS[1][:5], BLOCKS[1], logits=(1, 4), sampling=sampled, seq_id=1),
                        chunk(0, PROMPTS[2], BLOCKS[2], logits=(5,), seq_id=2)),
                    return_logits=True, return_probs=True)
    out = runner.execute(plan)
    assert [len(t) for t in out.tokens] == [1, 2, 0]
    vocab = tiny_torch.config.vocab_size
    assert out.logits.shape == (4, vocab) and out.probs.shape == (3, vocab)
    assert out.tokens[0] == [int(out.logits[0].argmax())]
    assert_same_predictions(out.logits[:1], tiny_torch.forward_tokens([PROMPTS[0]])[0, -1:])
    assert out.probs[0].max() == 1.0  # greedy: one-hot
    for row, token in zip((1, 2), out.tokens[1], strict=True):
        assert out.probs[row, token] > 0
    # the same seeded rows give the same tokens on their own: each row draws for its own position
    again = runner.execute(StepPlan(4, (plan.chunks[1],)))
    assert again.tokens == [out.tokens[1]] and again.logits is None and again.probs is None
    with pytest.raises(ValueError, match="the plan's blocks hold 8 tokens, this runner's 4"):
        runner.execute(StepPlan(8, plan.chunks))
    for copies, message in ((((1, 12),), r"block copy \(1, 12\) names a block outside \[0, 12\)"),
                            (((1, 4), (2, 4)), "write a block twice, or read a block they write"),
                            (((1, 4), (4, 6)), "write a block twice, or read a block they write")):
        with pytest.raises(ValueError, match=message):
            runner.execute(StepPlan(4, plan.chunks[:1], copies=copies))


def test_runner_runs_copies_before_the_forward(tiny_torch):
    """A sequence whose shared first block was copied (copy-on-write) computes from the copy."""
    runner = ModelRunner(tiny_torch, num_blocks=12, block_size=4, seed=0)
    ids = PROMPTS[1]
    runner.execute(StepPlan(4, (chunk(0, ids[:6], [1, 7], logits=()),)))
    # block 7 holds tokens 4, 5; copy block 1 (tokens 0..3) to block 4 and continue the sequence on [4, 7]
    out = runner.execute(StepPlan(4, (chunk(6, ids[6:], [4, 7, 3], logits=range(4)),), copies=((1, 4),),
                                  return_logits=True))
    assert_same_predictions(out.logits, tiny_torch.forward_tokens([ids])[0, 6:])
