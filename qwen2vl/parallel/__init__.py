"""Tensor parallelism over torch.distributed: shard the decoder across ranks (shard.py), start the ranks (launch.py)."""

from .launch import TensorParallelError, free_port, join_launcher_group, load_rank_model, require_group, run_ranks
from .shard import RankTextConfig, Share, check_vision_world_size, check_world_size, shard_decoder, shard_vision, share

__all__ = [
    "RankTextConfig",
    "Share",
    "TensorParallelError",
    "check_vision_world_size",
    "check_world_size",
    "free_port",
    "join_launcher_group",
    "load_rank_model",
    "require_group",
    "run_ranks",
    "shard_decoder",
    "shard_vision",
    "share",
]
