"""KV memory for the engine: one fixed slot of `max_model_len` positions per running request.

The pool (layers, slots, kv_heads, max_model_len, head_dim) is allocated once from an explicit byte budget.
A request's prefill writes its slot through an ordinary `KVCache` view (the same code path as a request run
alone); decode steps of many requests go through `SlotAttend`, which writes each row at its own position and
runs attention per row over exactly that row's tokens, so a row's result does not depend on its neighbours
(plays the role of vLLM's paged KV cache + attention backend, with slots instead of blocks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import TextConfig
from ..model import KVCache


def slot_bytes(cfg: TextConfig, max_model_len: int, dtype: torch.dtype) -> int:
    return KVCache.bytes_needed(cfg, 1, max_model_len, dtype)


class SlotPool:
    def __init__(self, cfg: TextConfig, slots: int, max_model_len: int, dtype: torch.dtype, device="cpu") -> None:
        if slots < 1:
            raise ValueError(
                "the KV budget does not fit one request of max_model_len tokens; raise the budget "
                "or lower max_model_len"
            )
        pool = KVCache(cfg, slots, max_model_len, dtype, device)  # one allocation path: a batch of `slots` rows
        self.k, self.v = pool.k, pool.v
        self.slots, self.max_model_len = slots, max_model_len

    def view(self, slot: int) -> KVCache:
        return KVCache.backed_by(self.k[:, slot : slot + 1], self.v[:, slot : slot + 1])


class SlotAttend:
    """Decode attention for rows living in different slots at different lengths: row b writes its one new
    key/value at position `lengths[b]` of slot `slots[b]` and attends to positions 0..lengths[b]. `fused`: the
    model's one-call decode attention (TextModel.decode_attention), tried first."""

    def __init__(self, pool: SlotPool, slots: list[int], lengths: list[int], fused=None) -> None:
        self.pool, self.slots, self.lengths, self.fused = pool, slots, lengths, fused

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            out = self.fused(q, k, v, self.pool.k[layer], self.pool.v[layer], self.lengths, None, self.slots)
            if out is not None:
                return out
        out = torch.empty_like(q)
        kk, vv = self.pool.k[layer], self.pool.v[layer]
        for b, (slot, pos) in enumerate(zip(self.slots, self.lengths)):
            kk[slot, :, pos] = k[b, :, 0]
            vv[slot, :, pos] = v[b, :, 0]
            out[b : b + 1] = F.scaled_dot_product_attention(
                q[b : b + 1],
                kk[slot : slot + 1, :, : pos + 1],
                vv[slot : slot + 1, :, : pos + 1],
                enable_gqa=k.shape[1] != q.shape[1],
            )
        return out
