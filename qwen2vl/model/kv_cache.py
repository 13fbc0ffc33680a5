"""A preallocated key/value cache owned by the caller (the model never allocates or keeps one).

Layout (layers, batch, kv_heads, max_len, head_dim), written at explicit slot offsets. Plays the role of
transformers' `DynamicCache`/`StaticCache` for `Qwen2VLForConditionalGeneration`.
"""

from __future__ import annotations

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device="cpu") -> None:
        shape = KVCache.shape(cfg, batch, max_len)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @staticmethod
    def shape(cfg: TextConfig, batch: int, max_len: int) -> tuple[int, int, int, int, int]:
        """(layers, batch, kv_heads, max_len, head_dim): the shape of each of the two tensors."""
        return (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)

    @staticmethod
    def bytes_needed(cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype) -> int:
        """The memory a cache of this size takes (keys and values)."""
        layers, batch, heads, max_len, head_dim = KVCache.shape(cfg, batch, max_len)
        return 2 * layers * batch * heads * max_len * head_dim * dtype.itemsize

    @classmethod
    def backed_by(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache backed by existing (layers, batch, kv_heads, max_len, head_dim) tensors, e.g. one engine slot."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len = k, v, k.shape[3]
        return cache

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, L, hd) at slots start..start+L; return all keys/values up to there."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; writing up to {end} does not fit")
        self.k[layer, : k.shape[0], :, start:end] = k
        self.v[layer, : v.shape[0], :, start:end] = v
        return self.k[layer, : k.shape[0], :, :end], self.v[layer, : v.shape[0], :, :end]
