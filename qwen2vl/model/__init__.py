"""The Qwen2-VL network: vision tower, decoder, positions, cache."""

from .kv_cache import KVCache
from .positions import PlaceholderMismatch, batch_mrope_positions, decode_positions, mrope_positions
from .qwen2vl import Qwen2VL

__all__ = ["KVCache", "PlaceholderMismatch", "Qwen2VL", "batch_mrope_positions", "decode_positions", "mrope_positions"]
