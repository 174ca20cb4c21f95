"""Tensor-parallel shards of quantized weights, cut on their GGUF bytes (no dequantize, no requantize).

A linear layer's weight is [N, K]: N output rows, each K inputs stored as K / block_size blocks of fmt.block_size
weights with their own scales (32 weights for the legacy and IQ formats, 256 for K-quants, 1 for F32/F16/BF16).

- Column-parallel layers (Q/K/V, gate/up: Megatron's name, their outputs are split) take a range of ROWS. GGUF rows
  are independent in every format, so any cut is exact: `shard_rows`.
- Row-parallel layers (the attention output, down) take a range of COLUMNS of every row, i.e. a range of each row's
  blocks: a cut inside a block would need the block's scales on two ranks, so columns are cut only on block
  boundaries: `shard_columns`. Where that is impossible, the ShardError names the tensor, its format and shape, and
  the rank counts that would work.

Shards are even: world ranks get total / world units each, a unit being what must not be cut (a head's head_dim rows
or columns, one FFN channel). Rank r takes the r-th range. The byte slices are exactly the bytes the whole tensor
holds for those weights, so every rank's dequantized shard equals the same slice of the whole dequantized weight
(tests/test_shard.py, every storage format).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from realm.quant import QTensor
from realm.runtime.config import ModelConfig
from realm.runtime.weights import LayerWeights

MAX_LISTED_WORLD = 64  # rank counts tried when an error lists the ones that would work


class ShardError(ValueError):
    """A weight that cannot be cut for this rank count; the message names the tensor and what would work."""


@dataclass(frozen=True)
class Cut:
    """What splits: `total` elements along one axis in units of `unit` (must not be cut), over `world` ranks."""

    total: int
    unit: int
    world: int

    def works(self, block: int = 1) -> bool:
        """Whether the units divide evenly over the ranks and every cut falls on a multiple of `block`."""
        if self.world < 1 or self.total % self.unit:
            return False
        units = self.total // self.unit
        return units % self.world == 0 and (self.total // self.world) % block == 0

    def range(self, rank: int) -> tuple[int, int]:
        part = self.total // self.world
        return rank * part, (rank + 1) * part


def working_worlds(total: int, unit: int, block: int = 1, most: int = MAX_LISTED_WORLD) -> list[int]:
    """The rank counts (1 .. most) over which `total` elements in units of `unit` split evenly on `block`
    boundaries."""
    return [w for w in range(1, most + 1) if Cut(total, unit, w).works(block)]


def _check_rank(rank: int, world: int) -> None:
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ShardError(f"world must be an int >= 1 (the number of ranks), got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ShardError(f"rank must be an int in [0, {world}), got {rank!r}")


def _refuse(name: str, w: QTensor, axis: str, cut: Cut, block: int, unit_name: str) -> ShardError:
    worlds = working_worlds(cut.total, cut.unit, block)
    what = f"{cut.total} {axis}" + (f" ({cut.total // cut.unit} {unit_name}s of {cut.unit})" if cut.unit > 1 else "")
    on_blocks = f" on {w.fmt.name} block boundaries ({block} weights)" if block > 1 else ""
    return ShardError(f"{name} ({w.fmt.name} {list(w.shape)}): {what} do not split evenly over {cut.world} ranks"
                      f"{on_blocks}; rank counts that work: {', '.join(map(str, worlds)) or 'none'}")


def shard_rows(w: QTensor, rank: int, world: int, name: str = "weight", unit: int = 1,
               unit_name: str = "unit") -> QTensor:
    """Rank `rank`'s rows of w (a column-parallel layer's weight), `unit` rows never cut apart (e.g. a head's
    head_dim rows). Exact in every format: rows are independent."""
    _check_rank(rank, world)
    cut = Cut(w.shape[0], unit, world)
    if not cut.works():
        raise _refuse(name, w, "rows", cut, 1, unit_name)
    return take_rows(w, *cut.range(rank))


def shard_columns(w: QTensor, rank: int, world: int, name: str = "weight", unit: int = 1,
                  unit_name: str = "unit") -> QTensor:
    """Rank `rank`'s columns of w (a row-parallel layer's weight): a range of whole blocks of every row, `unit`
    columns never cut apart. Raises ShardError where a cut would fall inside a block."""
    _check_rank(rank, world)
    block = w.fmt.block_size
    cut = Cut(w.shape[1], unit, world)
    if not cut.works(block):
        raise _refuse(name, w, "columns", cut, block, unit_name)
    start, stop = cut.range(rank)
    n, blocks = w.shape[0], w.shape[1] // block
    data = w.gguf_bytes().view(n, blocks, w.fmt.block_bytes)[:, start // block : stop // block]
    return QTensor(data.reshape(n, -1).contiguous(), w.fmt, (n, stop - start))


@dataclass(frozen=True)
class HeadSplit:
    """Which attention heads a rank holds: query heads [q_begin, q_end) and KV heads [kv_begin, kv_end). With more
    ranks than KV heads, ranks share (replicate) a KV head: each holds the one its query heads read."""

    q_begin: int
    q_end: int
    kv_begin: int
    kv_end: int


def split_heads(n_heads: int, n_kv_heads: int, rank: int, world: int) -> HeadSplit:
    """Query heads evenly over the ranks, each rank with the KV heads of its query heads (GQA groups kept whole)."""
    _check_rank(rank, world)
    if n_heads % world:
        works = [w for w in range(1, n_heads + 1) if _heads_work(n_heads, n_kv_heads, w)]
        raise ShardError(f"{n_heads} query heads do not split evenly over {world} ranks; rank counts that work: "
                         f"{', '.join(map(str, works))}")
    if not _heads_work(n_heads, n_kv_heads, world):
        works = [w for w in range(1, n_heads + 1) if _heads_work(n_heads, n_kv_heads, w)]
        raise ShardError(f"{n_kv_heads} KV heads neither split evenly over {world} ranks nor are shared evenly by "
                         f"them; rank counts that work: {', '.join(map(str, works))}")
    per_rank, group = n_heads // world, n_heads // n_kv_heads
    q_begin = rank * per_rank
    kv_begin = q_begin // group
    kv_end = -(-(q_begin + per_rank) // group)
    return HeadSplit(q_begin, q_begin + per_rank, kv_begin, kv_end)


def _heads_work(n_heads: int, n_kv_heads: int, world: int) -> bool:
    if n_heads % world:
        return False
    return n_kv_heads % world == 0 if world <= n_kv_heads else world % n_kv_heads == 0


def take_rows(w: QTensor, start: int, stop: int) -> QTensor:
    """Rows [start, stop) of w on its GGUF bytes (exact in every format)."""
    return QTensor(w.gguf_bytes()[start:stop].contiguous(), w.fmt, (stop - start, w.shape[1]))


def shard_layer(layer: LayerWeights, config: ModelConfig, rank: int, world: int, index: int) -> LayerWeights:
    """Rank `rank`'s part of transformer layer `index`: its query heads' rows of Q and their columns of the output
    projection, its KV heads' rows of K and V (shared when ranks outnumber KV heads), 1 / world of the FFN channels
    (rows of gate and up, the same columns of down); norms whole. The rank's attention output projection and down
    projection then give partial sums of the layer's outputs: summed over the ranks (the all-reduce), they are the
    whole layer's."""
    heads = split_heads(config.n_heads, config.n_kv_heads, rank, world)
    hd, p = config.head_dim, f"blk.{index}."
    q_rows, kv_rows = (heads.q_begin * hd, heads.q_end * hd), (heads.kv_begin * hd, heads.kv_end * hd)
    w_down = shard_columns(layer.w_down, rank, world, p + "ffn_down.weight", unit=1, unit_name="channel")
    gate_up = {f: shard_rows(getattr(layer, f), rank, world, p + name, unit=1, unit_name="channel")
               for f, name in (("w_gate", "ffn_gate.weight"), ("w_up", "ffn_up.weight"))}

    def part(bias: torch.Tensor | None, rows: tuple[int, int]) -> torch.Tensor | None:
        return None if bias is None else bias[rows[0] : rows[1]].clone()

    return dataclasses.replace(
        layer, wq=take_rows(layer.wq, *q_rows), wk=take_rows(layer.wk, *kv_rows), wv=take_rows(layer.wv, *kv_rows),
        wo=shard_columns(layer.wo, rank, world, p + "attn_output.weight", unit=hd, unit_name="head"),
        w_down=w_down, **gate_up, bq=part(layer.bq, q_rows), bk=part(layer.bk, kv_rows), bv=part(layer.bv, kv_rows))


def shard_config(config: ModelConfig, rank: int, world: int) -> ModelConfig:
    """The per-rank layer shape: its query and KV heads and FFN channels (hidden, vocabulary and the rest whole)."""
    heads = split_heads(config.n_heads, config.n_kv_heads, rank, world)
    return dataclasses.replace(config, n_heads=heads.q_end - heads.q_begin, n_kv_heads=heads.kv_end - heads.kv_begin,
                               ffn_hidden=config.ffn_hidden // world)
