"""Qwen2-VL: vision tower + Qwen2 decoder, with vision features written at the placeholder tokens.

Matches transformers `Qwen2VLForConditionalGeneration.forward` (4.45-4.57): the same input tensors as the
Qwen2-VL processor returns (left-padded batches), image and video features scattered in flattened batch order at
`<|image_pad|>` / `<|video_pad|>` positions (`Qwen2VLModel.forward`'s `masked_scatter`), M-RoPE positions by the
trained rule (4.x `Qwen2VLModel.get_rope_index`), logits
for every position. The module holds weights only; positions, masks and caches are arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Qwen2VLConfig
from .kv_cache import KVCache
from .positions import PlaceholderMismatch, batch_mrope_positions
from .text import TextModel
from .vision import VisionTransformer


class Qwen2VL(nn.Module):
    def __init__(self, config: Qwen2VLConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config.vision)
        self.model = TextModel(config.text)
        # tied checkpoints (2B) reuse the embedding matrix as the output projection
        self.lm_head = (
            None
            if config.text.tie_word_embeddings
            else nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        )
        # dtype of activations and of the KV cache; None: the weights' dtype. A transform such as
        # qwen2vl.cpu.use_cpu_kernels sets float32 while the weights stay bf16/int8.
        self.compute_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and cache entries."""
        return self.compute_dtype or self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision features (sum t*h*w/4, hidden) for images or videos."""
        return self.visual(pixel_values.to(self.device), grid_thw)

    def encode_vision_pieces(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, piece_flops: float):
        """`encode_vision` as a generator: next() runs about `piece_flops` of work; the features are its return
        value (StopIteration.value). Bit-identical; see VisionTransformer.encode_pieces."""
        return self.visual.encode_pieces(pixel_values.to(self.device), grid_thw, piece_flops)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (B, L, H) with vision features written at their placeholder tokens."""
        x = self.model.embed_tokens(input_ids.to(self.device)).to(self.dtype)
        for token, feats, name in (
            (self.config.image_token_id, image_features, "image"),
            (self.config.video_token_id, video_features, "video"),
        ):
            mask = input_ids.to(x.device) == token
            count = int(mask.sum())
            have = 0 if feats is None else feats.shape[0]
            if count != have:
                raise PlaceholderMismatch(
                    f"{name} features and {name} tokens do not match: input_ids hold {count} {name} tokens, "
                    f"the {name} inputs give {have} features (t*h*w/4 per item from {name}_grid_thw)"
                )
            if count:
                assert feats is not None  # count == have above
                x = x.masked_scatter(mask[..., None], feats.to(x.dtype))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied embeddings
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)

    def positions(self, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None):
        """(positions (3, B, L), deltas (B,)) by the trained M-RoPE rule; see positions.batch_mrope_positions."""
        cfg = self.config
        return batch_mrope_positions(
            input_ids,
            attention_mask,
            image_grid_thw,
            video_grid_thw,
            image_token_id=cfg.image_token_id,
            video_token_id=cfg.video_token_id,
            merge=cfg.vision.spatial_merge_size,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, L, vocab) for a whole prompt; with `cache`, its keys/values are written at slots 0..L-1."""
        return self.logits(
            self.hidden_states(
                input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, cache
            )
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """`forward` before the output projection: final hidden states (B, L, hidden), for callers that need the
        logits of a few positions only (training's loss)."""
        _check_pair("pixel_values", pixel_values, "image_grid_thw", image_grid_thw)
        _check_pair("pixel_values_videos", pixel_values_videos, "video_grid_thw", video_grid_thw)
        image_features = video_features = None
        if pixel_values is not None and image_grid_thw is not None:  # both or neither (checked above)
            image_features = self.encode_vision(pixel_values, image_grid_thw)
        if pixel_values_videos is not None and video_grid_thw is not None:
            video_features = self.encode_vision(pixel_values_videos, video_grid_thw)
        embeds = self.embed(input_ids, image_features, video_features)
        positions, _ = self.positions(input_ids, attention_mask, image_grid_thw, video_grid_thw)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        return self.model(embeds, positions.to(self.device), mask, cache, 0)


def _check_pair(a_name, a, b_name, b) -> None:
    if (a is None) != (b is None):
        given, missing = (a_name, b_name) if a is not None else (b_name, a_name)
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
