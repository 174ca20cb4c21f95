"""realm.parallel: tensor parallelism (issue 19, in progress). So far: cutting quantized weights and a layer into
per-rank shards on their GGUF bytes, with the head split (`shard.py`); the distributed forward is still to come."""

from .shard import (
    Cut,
    HeadSplit,
    ShardError,
    shard_columns,
    shard_config,
    shard_layer,
    shard_rows,
    split_heads,
    take_rows,
    working_worlds,
)

__all__ = ["Cut", "HeadSplit", "ShardError", "shard_columns", "shard_config", "shard_layer", "shard_rows",
           "split_heads", "take_rows", "working_worlds"]
