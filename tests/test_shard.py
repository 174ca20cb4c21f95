"""realm.parallel.shard: per-rank shards of quantized weights cut on their GGUF bytes. For every block format: each
rank's dequantized shard is bit for bit the same slice of the whole dequantized weight, the shards together are the
whole, and a cut that would fall inside a block is refused naming the tensor, the format and the rank counts that
work. SmolLM2's shapes at 3 ranks (the acceptance case of issue 19: 3 KV heads, rows of 576 and 1536 cut on
32-weight blocks)."""

import pytest
import torch
from quant_inputs import random_blocks
from tolerances import assert_equal

from realm.parallel import ShardError, shard_columns, shard_rows, split_heads, working_worlds
from realm.quant import FORMATS, QTensor

FORMAT_NAMES = list(FORMATS)


def _random_weight(fmt_name: str, rows: int, blocks_per_row: int, seed: int = 0) -> QTensor:
    """A weight of random valid blocks (every byte pattern a file may hold), [rows, blocks_per_row * block_size]."""
    fmt = FORMATS[fmt_name]
    data = random_blocks(fmt, rows * blocks_per_row, seed).view(rows, -1)
    return QTensor(data, fmt, (rows, blocks_per_row * fmt.block_size))


@pytest.mark.parametrize("fmt_name", FORMAT_NAMES)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_slices_of_the_whole(fmt_name, world):
    w = _random_weight(fmt_name, rows=6, blocks_per_row=6)
    whole = w.dequantize()
    n, k = w.shape
    rows = [shard_rows(w, r, world) for r in range(world)]
    cols = [shard_columns(w, r, world) for r in range(world)]
    for r in range(world):
        assert_equal(rows[r].dequantize(), whole[r * n // world : (r + 1) * n // world], what=f"rows of rank {r}")
        assert_equal(cols[r].dequantize(), whole[:, r * k // world : (r + 1) * k // world],
                     what=f"columns of rank {r}")
    assert_equal(torch.cat([s.gguf_bytes() for s in rows]), w.gguf_bytes())
    assert_equal(torch.cat([s.dequantize() for s in cols], dim=1), whole)


def test_units_are_never_cut():
    w = _random_weight("Q8_0", rows=4 * 8, blocks_per_row=2)  # 4 heads of 8 rows
    assert shard_rows(w, 1, 2, unit=8).shape == (16, 64)
    with pytest.raises(ShardError, match=r"32 rows \(4 heads of 8\) do not split evenly over 3 ranks; rank counts "
                                          r"that work: 1, 2, 4"):
        shard_rows(w, 0, 3, name="blk.0.attn_q.weight", unit=8, unit_name="head")


def test_a_cut_inside_a_block_is_refused_with_the_rank_counts_that_work():
    w = _random_weight("Q4_K", rows=2, blocks_per_row=3)  # 768 columns in 256-weight blocks
    with pytest.raises(ShardError) as e:
        shard_columns(w, 0, 2, name="blk.3.ffn_down.weight")
    message = str(e.value)
    for part in ("blk.3.ffn_down.weight", "Q4_K [2, 768]", "768 columns", "2 ranks", "Q4_K block boundaries (256 "
                 "weights)", "rank counts that work: 1, 3"):
        assert part in message, message
    assert shard_columns(w, 2, 3).shape == (2, 256)


def test_smollm2_shapes_at_three_ranks():
    """Q4_1 (32-weight blocks), SmolLM2-135M's layer: 9 query heads and 3 KV heads of 64, hidden 576, FFN 1536."""
    heads, kv_heads, head_dim, hidden, ffn = 9, 3, 64, 576, 1536
    q = _random_weight("Q4_1", heads * head_dim, hidden // 32)
    k = _random_weight("Q4_1", kv_heads * head_dim, hidden // 32, seed=1)
    o = _random_weight("Q4_1", hidden, heads * head_dim // 32, seed=2)
    down = _random_weight("Q4_1", hidden, ffn // 32, seed=3)
    for rank in range(3):
        assert shard_rows(q, rank, 3, unit=head_dim).shape == (192, 576)  # 3 query heads
        assert shard_rows(k, rank, 3, unit=head_dim).shape == (64, 576)  # 1 KV head
        assert shard_columns(o, rank, 3, unit=head_dim).shape == (576, 192)  # its 3 heads' columns: 6 blocks
        assert shard_columns(down, rank, 3).shape == (576, 512)  # 16 blocks
    assert working_worlds(ffn, 1, 32) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert working_worlds(heads * head_dim, head_dim, 32) == [1, 3, 9]


@pytest.mark.parametrize(("rank", "world"), [(0, 0), (2, 2), (-1, 2), (0, True), (1.0, 2)])
def test_bad_ranks_are_refused(rank, world):
    w = _random_weight("Q8_0", rows=4, blocks_per_row=2)
    with pytest.raises(ShardError, match=r"(rank|world) must be an int"):
        shard_rows(w, rank, world)


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "world", "expected"), [
    (9, 3, 3, [(0, 3, 0, 1), (3, 6, 1, 2), (6, 9, 2, 3)]),  # SmolLM2 at 3 ranks: one KV head each
    (8, 2, 4, [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]),  # more ranks than KV heads: shared
    (8, 8, 2, [(0, 4, 0, 4), (4, 8, 4, 8)]),  # MHA
    (4, 1, 2, [(0, 2, 0, 1), (2, 4, 0, 1)]),  # MQA: the one KV head on every rank
])
def test_heads_split_with_their_kv_heads(n_heads, n_kv_heads, world, expected):
    got = [split_heads(n_heads, n_kv_heads, r, world) for r in range(world)]
    assert [(s.q_begin, s.q_end, s.kv_begin, s.kv_end) for s in got] == expected
    group = n_heads // n_kv_heads
    for s in got:  # every query head's KV head is on its rank
        assert all(s.kv_begin <= h // group < s.kv_end for h in range(s.q_begin, s.q_end))


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "world", "refusal"), [
    (9, 3, 2, r"9 query heads do not split evenly over 2 ranks; rank counts that work: 1, 3, 9"),
    (12, 4, 6, r"4 KV heads neither split evenly over 6 ranks nor are shared evenly by them; rank counts that "
               r"work: 1, 2, 4, 12"),
])
def test_head_splits_that_cannot_work_name_what_would(n_heads, n_kv_heads, world, refusal):
    with pytest.raises(ShardError, match=refusal):
        split_heads(n_heads, n_kv_heads, 0, world)


@pytest.fixture(scope="module")
def smollm2():
    from realm.runtime.weights import load_weights

    return load_weights("smollm2")


def test_a_layer_sharded_over_three_ranks_sums_to_the_whole(smollm2):
    """SmolLM2's layer 0 over 3 ranks: every shard is the whole weight's slice (bit for bit), and the row-parallel
    projections' partial outputs sum to the whole projection (float32 summation order aside)."""
    from tolerances import assert_close, dot_magnitude

    from realm.parallel import shard_config, shard_layer

    config, layer, world = smollm2.config, smollm2.layers[0], 3
    shards = [shard_layer(layer, config, r, world, 0) for r in range(world)]
    hd = config.head_dim
    dense = {f: getattr(layer, f).dequantize() for f in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    ffn = config.ffn_hidden // world
    for r, s in enumerate(shards):
        assert_equal(s.wq.dequantize(), dense["wq"][r * 3 * hd : (r + 1) * 3 * hd])
        assert_equal(s.wk.dequantize(), dense["wk"][r * hd : (r + 1) * hd])
        assert_equal(s.wv.dequantize(), dense["wv"][r * hd : (r + 1) * hd])
        assert_equal(s.wo.dequantize(), dense["wo"][:, r * 3 * hd : (r + 1) * 3 * hd])
        assert_equal(s.w_gate.dequantize(), dense["w_gate"][r * ffn : (r + 1) * ffn])
        assert_equal(s.w_down.dequantize(), dense["w_down"][:, r * ffn : (r + 1) * ffn])
        assert s.attn_norm is layer.attn_norm
    local = shard_config(config, 1, world)
    assert (local.n_heads, local.n_kv_heads, local.ffn_hidden, local.hidden) == (3, 1, 512, 576)

    x = torch.randn(5, config.hidden, generator=torch.Generator().manual_seed(0))
    h = torch.nn.functional.silu(x @ dense["w_gate"].T) * (x @ dense["w_up"].T)
    whole = h @ dense["w_down"].T
    parts = sum((torch.nn.functional.silu(x @ s.w_gate.dequantize().T) * (x @ s.w_up.dequantize().T))
                @ s.w_down.dequantize().T for s in shards)
    assert_close(parts, whole, magnitude=dot_magnitude(h, dense["w_down"]), what="MLP over 3 ranks")


def test_a_layer_that_cannot_be_cut_names_its_tensor(smollm2):
    import dataclasses

    from realm.parallel import shard_layer

    layer = dataclasses.replace(smollm2.layers[4], w_down=_random_weight("Q4_K", smollm2.config.hidden, 6))
    with pytest.raises(ShardError, match=r"blk\.4\.ffn_down\.weight \(Q4_K \[576, 1536\]\): 1536 columns do not "
                                         r"split evenly over 4 ranks on Q4_K block boundaries \(256 weights\); rank "
                                         r"counts that work: 1, 2, 3, 6"):
        shard_layer(layer, dataclasses.replace(smollm2.config, n_heads=8, n_kv_heads=4), 0, 4, 4)
