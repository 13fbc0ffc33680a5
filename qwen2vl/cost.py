"""What an image or video will cost before the work starts: its tokens, and an estimate of the time.

The estimate counts the floating-point operations of the vision encode (`Qwen2VisionTransformerPretrainedModel`: patch
embedding, `depth` blocks with attention within each frame, the 2x2 merger) and of prefilling the item's tokens
through the decoder, and divides by this machine's rate, measured once per process on a matrix product of the vision
tower's width in the model's arithmetic dtype (float32 on CPU, `qwen2vl.cpu`). Attention and the small operations run
below the matrix-product rate, so the estimate errs on the short side; it is meant to tell seconds from tens of
minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import Qwen2VLConfig, TextConfig, VisionConfig

_RATES: dict[tuple[str, torch.dtype], float] = {}  # (device, dtype) -> measured FLOP/s


@dataclass(frozen=True)
class ItemCost:
    tokens: int
    flops: float
    seconds: float
    rate: float  # FLOP/s the estimate used

    def describe(self) -> str:
        return f"{self.tokens} tokens, about {duration(self.seconds)}"


def vision_flops(cfg: VisionConfig, grid_thw: tuple[int, int, int]) -> float:
    """Multiply-adds x 2 of encoding one item of grid (t, h, w) patches."""
    t, h, w = grid_thw
    n, e, frame = t * h * w, cfg.embed_dim, h * w
    per_block = n * (8 * e * e + 4 * e * cfg.mlp_dim) + 4 * t * frame * frame * e  # qkv, proj, mlp; QK^T and PV
    merged = n // cfg.spatial_merge_size**2
    merger = 2 * merged * cfg.merge_dim * (cfg.merge_dim + cfg.hidden_size)
    return 2 * n * cfg.patch_dim * e + cfg.depth * per_block + merger


def prefill_flops(cfg: TextConfig, tokens: int) -> float:
    """Running `tokens` new tokens through the decoder (the items' share of a prefill), causal attention included."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
    linear = 2 * h * (2 * h + 2 * kv) + 6 * h * cfg.intermediate_size  # q, o, k, v; gate, up, down
    return cfg.num_hidden_layers * tokens * (linear + 2 * tokens * h)


def measured_rate(device: torch.device, dtype: torch.dtype, width: int = 1024) -> float:
    """FLOP/s of a (512, width) x (width, width) product here, the best of a tenth of a second's runs; cached."""
    key = (str(device), dtype)
    if key not in _RATES:
        a = torch.randn(512, width, device=device).to(dtype)
        b = torch.randn(width, width, device=device).to(dtype)
        best, spent = float("inf"), 0.0
        a @ b  # warm-up: thread pools, kernels
        while spent < 0.1:
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            took = time.perf_counter() - t0
            best, spent = min(best, took), spent + took
        _RATES[key] = 2 * 512 * width * width / max(best, 1e-9)
    return _RATES[key]


def item_cost(
    config: Qwen2VLConfig, grid_thw: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> ItemCost:
    tokens = grid_thw[0] * grid_thw[1] * grid_thw[2] // config.vision.spatial_merge_size**2
    flops = vision_flops(config.vision, grid_thw) + prefill_flops(config.text, tokens)
    rate = measured_rate(device, dtype, config.vision.embed_dim)
    return ItemCost(tokens, flops, flops / rate, rate)


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
