"""The Qwen2 decoder with multimodal rotary positions.

Matches transformers `Qwen2VLTextModel` / `Qwen2VLDecoderLayer` / `Qwen2VLAttention` (4.45-5.x): pre-norm
RMSNorm blocks, q/k/v with biases and o_proj without, grouped-query attention, causal with a padding mask.
Attribute names follow the checkpoint (`model.layers.{i}.self_attn.q_proj`, ...). Positions arrive as an
explicit (3, B, L) tensor; keys and values go to a caller-owned KVCache when one is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from .kv_cache import KVCache
from .layers import RMSNorm, SwiGLU, apply_rope
from .rope import mrope_cos_sin


class Attention(nn.Module):
    rope = staticmethod(apply_rope)  # a backend may set a fused in-place version on an instance (qwen2vl/cpu.py)

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attend: Attend, layer: int):
        b, n, _ = x.shape
        # (B, L, heads*hd) -> (B, heads, L, hd)
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        out = attend(layer, q, k, v)  # (B, heads, L, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # dtype of the MLP's activations over a prompt (more than one new token per sequence); None: the residual
        # stream's. A transform may set bf16 while the residual stream, the norms, attention, the KV cache and
        # every decode step stay float32 (qwen2vl.cpu, on CPUs with bf16 products).
        self.prompt_mlp_dtype: torch.dtype | None = None

    def forward(self, x, cos, sin, attend, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend, layer)
        h = self.post_attention_layernorm(x)
        if self.prompt_mlp_dtype is not None and x.shape[1] > 1:
            h = h.to(self.prompt_mlp_dtype)
        return x + self.mlp(h)


def attention_mask_4d(
    attention_mask: torch.Tensor | None, batch: int, n: int, start: int, device
) -> torch.Tensor | None:
    """Boolean (B, 1, n, start+n) mask: causal and not padding. None when plain causal attention suffices.

    `attention_mask` (B, start+n) marks real tokens with 1 over the cached and the new slots. A query slot that is
    itself padding may see itself, so no row is empty (its output is never used).
    """
    total = start + n
    if attention_mask is None or bool(attention_mask.all()):
        if start == 0 or n == 1:
            return None  # plain causal (or: one new token sees everything cached)
        valid = torch.ones(batch, total, dtype=torch.bool, device=device)
    else:
        valid = attention_mask.to(device=device, dtype=torch.bool)
    q_slot = torch.arange(start, total, device=device)[:, None]
    k_slot = torch.arange(total, device=device)[None, :]
    causal = k_slot <= q_slot  # (n, total)
    mask = causal[None] & valid[:, None, :]
    mask |= (k_slot == q_slot)[None]
    return mask[:, None]


class Attend:
    """Where keys and values go and how queries see them: plain causal attention over the new tokens, optionally
    after the caller's KVCache (slots start..start+L of every row). Other layouts (the engine's per-request
    slots) provide the same call: attend(layer, q, k, v) -> (B, heads, L, hd).

    `fused`: a backend's one-call decode-step attention (TextModel.decode_attention), tried first for one new token
    per row with a cache; it returns None for what it does not take."""

    def __init__(self, mask: torch.Tensor | None, cache: KVCache | None, start: int, fused=None) -> None:
        self.mask, self.cache, self.start, self.fused = mask, cache, start, fused

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.cache is not None and q.shape[2] == 1:
            rows = q.shape[0]
            cache_k, cache_v = self.cache.k[layer, :rows], self.cache.v[layer, :rows]
            out = self.fused(q, k, v, cache_k, cache_v, [self.start] * rows, self.mask)
            if out is not None:
                return out
        if self.cache is not None:
            k, v = self.cache.write(layer, self.start, k, v)
        causal = self.mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.mask, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]
        )


class TextModel(nn.Module):
    # a decode step's attention in one call, with kernels.decode_attention's signature: a backend may set it on an
    # instance (qwen2vl/cpu.py); Attend and the engine's SlotAttend try it first
    decode_attention = None

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # weights always come from a checkpoint: pass an uninitialised matrix, because nn.Embedding's own normal_()
        # init on the meta device imports ~900 decomposition modules (+158 MB resident) for nothing
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        attend: Attend | None = None,
    ) -> torch.Tensor:
        """embeds (B, L, H), positions (3, B, L) -> final hidden states (B, L, H), after the last norm.

        Keys/values go to `cache` at slots start..start+L (attention_mask then covers start+L slots), or wherever
        a custom `attend` puts them.
        """
        cfg = self.cfg
        b, n, _ = embeds.shape
        cos, sin = mrope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, embeds.dtype)
        if attend is None:
            mask = attention_mask_4d(attention_mask, b, n, start, embeds.device)
            attend = Attend(mask, cache, start, self.decode_attention)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attend, i)
        return self.norm(x)
