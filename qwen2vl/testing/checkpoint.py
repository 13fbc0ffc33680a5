"""Random Qwen2-VL checkpoints in the official on-disk format, for tests and benchmarks (no network).

Writes what a hub repository holds: config.json (flat text fields, sparse-looking vision_config, `rope_scaling`
of type mrope), safetensors weights under the original key names (`visual.*`, `model.*`, `lm_head.*`; or the
transformers >= 4.52 names), optionally sharded with model.safetensors.index.json, tokenizer.json /
tokenizer_config.json on the real Qwen2 vocabulary, preprocessor_config.json and generation_config.json.
Tensor names and shapes are those of the hub's model.safetensors.index.json, written here independently of the
model code, so a transposed weight or a wrong head order in the model cannot hide. Seeded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import DTYPES

# Odd sizes on purpose: widths that are not powers of two, 3 query heads per kv head, an uneven mrope_section,
# a vision head count of 3 and an MLP ratio that is not an integer.
TINY_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 72,
    "intermediate_size": 200,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rope_scaling": {"type": "mrope", "mrope_section": [3, 2, 1]},
}
TINY_VISION: dict[str, Any] = {"depth": 2, "embed_dim": 60, "num_heads": 3, "mlp_ratio": 2.5, "hidden_size": 72}

# The real 2B-Instruct shapes (its hub config.json), for benchmarks and the loader's memory measurement.
SHAPES_2B_TEXT: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
SHAPES_2B_VISION: dict[str, Any] = {
    "hidden_size": 1536,
    "in_chans": 3,
    "model_type": "qwen2_vl",
    "spatial_patch_size": 14,
}

GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_k": 1,
    "top_p": 0.001,
}


def make_config(text: dict | None = None, vision: dict | None = None, **root: Any) -> dict[str, Any]:
    """A config.json dict in the layout of the official uploads (text fields at the root)."""
    text = dict(TINY_TEXT if text is None else text)
    cfg = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "initializer_range": 0.02,
        "max_position_embeddings": 32768,
        "max_window_layers": text.get("num_hidden_layers", 28),
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": dict(TINY_VISION if vision is None else vision),
    }
    cfg.update(text)
    cfg.update(root)
    return cfg


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, in the original key layout (hub checkpoints; transformers 4.45-4.51 names)."""
    v = {
        "depth": 32,
        "embed_dim": 1280,
        "num_heads": 16,
        "mlp_ratio": 4,
        "in_channels": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "hidden_size": 3584,
    }
    v.update({k: cfg["vision_config"][k] for k in v if k in cfg["vision_config"]})
    e, mlp, merged = v["embed_dim"], int(v["embed_dim"] * v["mlp_ratio"]), v["embed_dim"] * v["spatial_merge_size"] ** 2
    shapes: dict[str, tuple[int, ...]] = {
        "visual.patch_embed.proj.weight": (
            e,
            v["in_channels"],
            v["temporal_patch_size"],
            v["patch_size"],
            v["patch_size"],
        ),
    }
    for i in range(v["depth"]):
        p = f"visual.blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (e,),
                p + "norm1.bias": (e,),
                p + "norm2.weight": (e,),
                p + "norm2.bias": (e,),
                p + "attn.qkv.weight": (3 * e, e),
                p + "attn.qkv.bias": (3 * e,),
                p + "attn.proj.weight": (e, e),
                p + "attn.proj.bias": (e,),
                p + "mlp.fc1.weight": (mlp, e),
                p + "mlp.fc1.bias": (mlp,),
                p + "mlp.fc2.weight": (e, mlp),
                p + "mlp.fc2.bias": (e,),
            }
        )
    shapes.update(
        {
            "visual.merger.ln_q.weight": (e,),
            "visual.merger.ln_q.bias": (e,),
            "visual.merger.mlp.0.weight": (merged, merged),
            "visual.merger.mlp.0.bias": (merged,),
            "visual.merger.mlp.2.weight": (v["hidden_size"], merged),
            "visual.merger.mlp.2.bias": (v["hidden_size"],),
        }
    )
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes["model.embed_tokens.weight"] = (vocab, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Scaled so activations stay O(1) through the tiny network and every weight moves the logits."""
    if (
        name.endswith("norm.weight")
        or "norm1.weight" in name
        or "norm2.weight" in name
        or "ln_q.weight" in name
        or name.endswith("layernorm.weight")
    ):
        t = 1.0 + 0.2 * torch.randn(shape, generator=gen)
    elif name.endswith(".bias"):
        t = 0.2 * torch.randn(shape, generator=gen)
    elif name == "model.embed_tokens.weight":
        t = torch.randn(shape, generator=gen)
    else:
        fan_in = math.prod(shape[1:])
        t = torch.randn(shape, generator=gen) * (1.5 / math.sqrt(fan_in))
    return t.to(dtype)


def write_checkpoint(
    directory: str | Path,
    config: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    key_layout: str = "original",
    shards: int = 1,
    tokenizer: bool = True,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete random checkpoint; returns the directory.

    key_layout: "original" (hub uploads) or "transformers" (model.visual.* / model.language_model.*).
    extra_tensors: added verbatim under their own names (to test that unused keys are refused).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = make_config() if config is None else config
    config = {**config, "torch_dtype": {v: k for k, v in DTYPES.items()}[dtype]}
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, gen, dtype) for name, shape in tensor_shapes(config).items()}
    if key_layout == "transformers":
        tensors = {_new_layout(k): t for k, t in tensors.items()}
    elif key_layout != "original":
        raise ValueError(f"key_layout must be 'original' or 'transformers', not {key_layout!r}")
    tensors.update(extra_tensors or {})
    _save_sharded(tensors, directory, shards)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    if tokenizer:
        from .tokenizer_files import write_preprocessor_config, write_tokenizer_files

        write_tokenizer_files(directory)
        write_preprocessor_config(directory)
    return directory


def _new_layout(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    return key


def _save_sharded(tensors: dict[str, torch.Tensor], directory: Path, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(tensors)
    size = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * size : (i + 1) * size]}
        save_file(part, directory / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
