"""The vocabulary-parallel token embedding (realm.parallel.tensor_parallel, realm.runtime.transformer.Embedding),
without processes: each rank's shard holds only its vocabulary range's rows, its lookup gives zeros for the other ids,
and the ranks' lookups summed (what the all-reduce does) are the whole lookup bit for bit. The end-to-end runs over
gloo are in test_tensor_parallel.py."""

from __future__ import annotations

import pytest
import torch
from tiny_gguf import write_tiny_llama

from realm.parallel.tensor_parallel import AllReduce, shard_weights, tensor_parallel_transformer
from realm.runtime.transformer import Embedding, Transformer
from realm.runtime.weights import load_weights

VOCAB = 48  # splits over 1, 2 and 3 ranks (TINY's 50 does not over 3)
DIMS = {"vocab": VOCAB, "n_heads": 6, "n_kv_heads": 6, "hidden": 96}  # heads too, so that shard_weights runs for 3


@pytest.fixture(scope="module", params=[None, "F16", "Q4_0"], ids=["F32", "F16", "Q4_0"])
def weights(request, tmp_path_factory):
    """A tiny model whose token embedding is stored in the format (None: float32), tied or not by format so that
    both the tied shard and the separate one are covered."""
    path = tmp_path_factory.mktemp("embd") / "tiny.gguf"
    fmt = request.param
    write_tiny_llama(path, tied=fmt == "Q4_0", dims=DIMS,
                     formats={} if fmt is None else {"token_embd": fmt, "output": fmt})
    return load_weights(path)


def _lookup(weights, tokens: torch.Tensor) -> torch.Tensor:
    return Embedding(weights.token_embd.dequantize(), VOCAB, weights.vocab_start).lookup(tokens)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_ranks_lookups_sum_to_the_whole_lookup(weights, world):
    tokens = torch.cat([torch.randperm(VOCAB, generator=torch.Generator().manual_seed(world)),
                        torch.tensor([0, VOCAB - 1, 5, 5])])  # every id, the ends, a repeat
    whole = _lookup(weights, tokens)
    parts = []
    for rank in range(world):
        shard = shard_weights(weights, rank, world)
        start, stop = rank * VOCAB // world, (rank + 1) * VOCAB // world
        assert shard.vocab_start == start and shard.token_embd.shape == (VOCAB // world, DIMS["hidden"])
        assert shard.tied == weights.tied  # the tied head stays the embedding's shard, not a second copy
        part = _lookup(shard, tokens)
        inside = (tokens >= start) & (tokens < stop)
        assert torch.equal(part[inside], whole[inside]), f"rank {rank}: its ids' rows"
        assert not part[~inside].any(), f"rank {rank}: zeros for the other ranks' ids"
        parts.append(part)
    assert torch.equal(torch.stack(parts).sum(0), whole)


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_model_holds_only_its_vocabulary_rows(weights, world):
    """A rank's Transformer as tensor_parallel_transformer builds it (the collectives attached, none run): the
    embedding and the head hold vocab / world rows, the whole model's rows of the rank's range."""
    whole = Transformer(weights)
    for rank in range(world):
        net = tensor_parallel_transformer(weights, rank, world)
        start, stop = rank * VOCAB // world, (rank + 1) * VOCAB // world
        assert net.embedding.shape == (VOCAB // world, DIMS["hidden"])
        assert torch.equal(net.embedding, whole.embedding[start:stop])
        assert net.embed.start == start and isinstance(net.embed.reduce, AllReduce)
        assert net.head.out_features == VOCAB // world


def test_a_shard_without_its_all_reduce_is_refused(weights):
    net = Transformer(shard_weights(weights, 1, 2))  # no collectives attached
    with pytest.raises(ValueError, match=r"holds only ids \[24, 48\) of 48: a vocabulary-parallel shard needs its "
                                         r"reduce"):
        net.embed(torch.tensor([0, 30]))


def test_rows_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match=r"token_embd rows \[40, 56\) are not within the vocabulary of 48"):
        Embedding(torch.zeros(16, 4), VOCAB, 40)
