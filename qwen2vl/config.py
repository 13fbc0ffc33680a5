"""Typed, frozen configuration read from a checkpoint's config.json.

Matches what transformers builds from the same file (`Qwen2VLConfig`, `Qwen2VLTextConfig`,
`Qwen2VLVisionConfig`, 4.45-5.x): text fields at the root or under `text_config`; M-RoPE sections under
`rope_scaling` (`type: mrope` or `default`) or `rope_parameters` (5.x); a sparse `vision_config` whose missing
fields take the reference class defaults (`Qwen2VLVisionConfig.__init__`; `in_chans` and `spatial_patch_size`
are ignored there too).
Every key read is named here; inconsistent values raise `ConfigError` with the values in the message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """config.json is missing a field, or its values contradict each other."""


# config.json "torch_dtype" names; the one table of dtype names (the CLI lists the same names without torch)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class VisionConfig:
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_size: int = 3584  # PatchMerger output width = the language model's hidden size
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P (1176 for the official checkpoints)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_dim(self) -> int:
        return self.embed_dim * self.spatial_merge_size**2


@dataclass(frozen=True, slots=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True, slots=True)
class Qwen2VLConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    torch_dtype: torch.dtype | None = None  # the dtype the checkpoint was saved in, if it says
    quantization_config: dict | None = None  # as config.json has it (AWQ / GPTQ); qwen2vl.quant reads it

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen2VLConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json here; is this a Qwen2-VL checkpoint directory?") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(data)
        except ConfigError as e:  # the same kind (e.g. qwen2vl.quant.QuantizationError), with the file named
            raise type(e)(f"{path}: {e}") from None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen2VLConfig:
        model_type = d.get("model_type")
        if model_type not in (None, "qwen2_vl"):
            raise ConfigError(f"model_type is {model_type!r}; this package implements 'qwen2_vl' only")
        text_d = d.get("text_config") or d  # 5.x nests the text fields; older files keep them at the root
        text = _text_from_dict(text_d, root=d)
        vision = _vision_from_dict(d.get("vision_config") or {})
        if vision.hidden_size != text.hidden_size:
            raise ConfigError(
                f"vision_config.hidden_size ({vision.hidden_size}) must equal the text hidden_size "
                f"({text.hidden_size}): the patch merger writes into the text embedding space"
            )
        dtype_name = d.get("torch_dtype") or d.get("dtype") or text_d.get("torch_dtype") or text_d.get("dtype")
        eos = d.get("eos_token_id", text_d.get("eos_token_id", 151645))
        return cls(
            text=text,
            vision=vision,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            bos_token_id=d.get("bos_token_id", text_d.get("bos_token_id", 151643)),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            torch_dtype=DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None,
            quantization_config=d.get("quantization_config"),
        )


def _rope_fields(d: dict[str, Any]) -> tuple[tuple[int, ...], float]:
    """mrope_section and rope_theta from `rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    rope = d.get("rope_parameters") or d.get("rope_scaling")
    if not rope:
        raise ConfigError("no rope_scaling / rope_parameters with an mrope_section; Qwen2-VL needs one")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ConfigError(f"rope type {kind!r} is not supported (Qwen2-VL uses 'mrope' / 'default')")
    if "mrope_section" not in rope:
        raise ConfigError(f"rope settings {rope} have no mrope_section")
    theta = rope.get("rope_theta", d.get("rope_theta", 1000000.0))
    return tuple(int(s) for s in rope["mrope_section"]), float(theta)


def _text_from_dict(d: dict[str, Any], root: dict[str, Any]) -> TextConfig:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in d]
    if missing:
        raise ConfigError(f"text config lacks {missing}")
    if d.get("use_sliding_window", False):
        raise ConfigError("use_sliding_window=true is not supported (no official Qwen2-VL checkpoint uses it)")
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"text hidden_act {d['hidden_act']!r} is not supported (expected 'silu')")
    section, theta = _rope_fields(d if ("rope_scaling" in d or "rope_parameters" in d) else root)
    tie = d.get("tie_word_embeddings", root.get("tie_word_embeddings", False))
    cfg = TextConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
        mrope_section=section,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),  # reference class default; checkpoints say 1e-6
        rope_theta=theta,
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(tie),
    )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
        )
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(
            f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.head_dim % 2 or sum(cfg.mrope_section) != cfg.head_dim // 2:
        raise ConfigError(
            f"mrope_section {list(cfg.mrope_section)} sums to {sum(cfg.mrope_section)}, but head_dim "
            f"{cfg.head_dim} (hidden_size {cfg.hidden_size} / {cfg.num_attention_heads} heads) needs "
            f"{cfg.head_dim // 2} frequency pairs"
        )
    if len(cfg.mrope_section) != 3:
        raise ConfigError(f"mrope_section {list(cfg.mrope_section)} must have 3 parts (t, h, w)")
    return cfg


def _vision_from_dict(d: dict[str, Any]) -> VisionConfig:
    defaults = VisionConfig()
    rope = d.get("rope_parameters") or {}
    cfg = VisionConfig(
        depth=int(d.get("depth", defaults.depth)),
        embed_dim=int(d.get("embed_dim", defaults.embed_dim)),
        num_heads=int(d.get("num_heads", defaults.num_heads)),
        mlp_ratio=float(d.get("mlp_ratio", defaults.mlp_ratio)),
        hidden_act=str(d.get("hidden_act", defaults.hidden_act)),
        in_channels=int(d.get("in_channels", defaults.in_channels)),  # `in_chans` is ignored, as in the reference
        patch_size=int(d.get("patch_size", defaults.patch_size)),  # `spatial_patch_size` likewise
        temporal_patch_size=int(d.get("temporal_patch_size", defaults.temporal_patch_size)),
        spatial_merge_size=int(d.get("spatial_merge_size", defaults.spatial_merge_size)),
        hidden_size=int(d.get("hidden_size", defaults.hidden_size)),
        rope_theta=float(rope.get("rope_theta", defaults.rope_theta)),
    )
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
        raise ConfigError(f"vision hidden_act {cfg.hidden_act!r} is not supported")
    if cfg.embed_dim % cfg.num_heads or cfg.head_dim % 4:
        raise ConfigError(
            f"vision embed_dim {cfg.embed_dim} / num_heads {cfg.num_heads} must give a head_dim divisible by 4 "
            f"(2-D rotary halves), got {cfg.embed_dim / cfg.num_heads}"
        )
    return cfg
