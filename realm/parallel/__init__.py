"""realm.parallel: tensor parallelism on torch.distributed (gloo on CPUs, NCCL on GPUs).

- `shard.py`: cutting quantized weights and a layer into per-rank shards on their GGUF bytes, with the head split;
- `tensor_parallel.py`: a rank's model (its shard, the all-reduces and the vocabulary gather in the linear layers'
  epilogues), rank 0's plans to the other ranks (PlanBroadcast) and their side (follow_plans), RankFailure;
- `lora_shard.py`: LoRA adapters cut with their layers; rank 0 loads them, the plans carry them to the others;
- `launch.py`: `realm.LLM(..., tensor_parallel=N)` spawning its ranks, and `torchrun ... -m realm generate|serve`.
"""

from .lora_shard import ShardedLoraRegistry, shard_adapter, shard_lora_registry
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
from .tensor_parallel import (
    PlanBroadcast,
    RankFailure,
    attach_collectives,
    follow_plans,
    load_tensor_parallel,
    shard_weights,
    tensor_parallel_transformer,
)

__all__ = ["Cut", "HeadSplit", "PlanBroadcast", "RankFailure", "ShardError", "ShardedLoraRegistry",
           "attach_collectives", "follow_plans", "load_tensor_parallel", "shard_adapter", "shard_columns",
           "shard_config", "shard_layer", "shard_lora_registry", "shard_rows", "shard_weights", "split_heads",
           "take_rows", "tensor_parallel_transformer", "working_worlds"]
