"""Rotary tables: 2-D rotary for the vision tower and M-RoPE for the decoder.

Match transformers `VisionRotaryEmbedding` + `Qwen2VisionTransformerPretrainedModel.rot_pos_emb`
and `Qwen2VLRotaryEmbedding` + `apply_multimodal_rotary_pos_emb`. inv_freq is computed here on each call, in
float32, with the reference's expression, so no buffer can be cast to bf16 by `module.to()` (the reference keeps
`inv_freq` in float32 and computes cos/sin in float32 under bf16 weights).
"""

from __future__ import annotations

import torch


def inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """1 / theta^(2i/dim) for i < dim/2, float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta**exponents)


def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(h, w) patch coordinates in 2x2 merge-window order, repeated over t: (sum t*h*w, 2) int64."""
    ids = []
    for t, h, w in grid_thw.tolist():
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # (bh, mh, bw, mw) -> (bh, bw, mh, mw): the row order of pixel_values
        hw = torch.stack([hh.permute(0, 2, 1, 3).flatten(), ww.permute(0, 2, 1, 3).flatten()], dim=-1)
        ids.append(hw.repeat(t, 1))
    return torch.cat(ids)


def vision_cos_sin(grid_thw: torch.Tensor, head_dim: int, theta: float, merge: int, device: torch.device):
    """cos, sin of shape (N, head_dim), float32: angles [h*f, w*f] duplicated for rotate_half."""
    pos = vision_position_ids(grid_thw, merge).to(device)
    freqs = inv_freq(head_dim // 2, theta, device)  # head_dim/4 frequencies per axis
    angles = (pos[:, :, None].float() * freqs).flatten(1)  # (N, 2, F) -> (N, 2F)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, section: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (3, B, L) -> cos, sin (B, 1, L, head_dim) in `dtype`.

    Frequency pair i takes its position from stream t, h or w according to `section` (e.g. [16, 24, 24]);
    the same choice is used for both halves of rotate_half.
    """
    freqs = inv_freq(head_dim, theta, positions.device)  # (head_dim/2,)
    angles = positions[..., None].float() * freqs  # (3, B, L, head_dim/2)
    device = positions.device
    stream = torch.repeat_interleave(torch.arange(3, device=device), torch.tensor(section, device=device))
    angles = angles.gather(0, stream.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)  # (B, L, hd/2)
    emb = torch.cat((angles, angles), dim=-1).unsqueeze(1)
    return emb.cos().to(dtype), emb.sin().to(dtype)
