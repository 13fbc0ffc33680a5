"""config.json in every layout the official and transformers-saved checkpoints use ."""

from __future__ import annotations

import json

import pytest

from qwen2vl.config import ConfigError, Qwen2VLConfig, VisionConfig
from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config

# the root of the official 7B-Instruct config.json, with its sparse vision_config
OFFICIAL_7B = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {"in_chans": 3, "model_type": "qwen2_vl", "spatial_patch_size": 14},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_official_7b_fills_vision_defaults_like_the_reference():
    cfg = Qwen2VLConfig.from_hf_dict(OFFICIAL_7B)
    assert cfg.vision == VisionConfig()  # depth 32, width 1280, 16 heads, quick_gelu, merger out 3584
    assert cfg.text.head_dim == 128 and cfg.text.num_kv_groups == 7 and cfg.text.mrope_section == (16, 24, 24)
    assert cfg.text.rms_norm_eps == 1e-6 and cfg.text.rope_theta == 1e6 and not cfg.text.tie_word_embeddings
    assert str(cfg.torch_dtype) == "torch.bfloat16"


def test_2b_shapes_tied():
    cfg = Qwen2VLConfig.from_hf_dict(make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION))
    assert cfg.text.tie_word_embeddings and cfg.vision.hidden_size == 1536 and cfg.text.num_kv_groups == 6


def test_all_rope_layouts_agree():
    base = Qwen2VLConfig.from_hf_dict(OFFICIAL_7B)
    resaved = {
        **OFFICIAL_7B,
        "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
    }
    text_keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ]
    v5 = {k: v for k, v in OFFICIAL_7B.items() if k not in text_keys + ["rope_scaling", "rope_theta"]}
    v5["text_config"] = {k: OFFICIAL_7B[k] for k in text_keys}
    v5["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    v5["dtype"] = v5.pop("torch_dtype")
    assert Qwen2VLConfig.from_hf_dict(resaved) == base
    assert Qwen2VLConfig.from_hf_dict(v5) == base


def test_reads_config_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL_7B))
    assert Qwen2VLConfig.from_file(tmp_path).text.hidden_size == 3584


@pytest.mark.parametrize(
    "change, words",
    [
        ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 16]}}, ["[16, 24, 16]", "56", "128", "64"]),
        ({"num_key_value_heads": 5}, ["28", "5"]),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "mrope_section": [16, 24, 24]}}, ["yarn"]),
        ({"rope_scaling": None}, ["mrope_section"]),
        ({"model_type": "qwen2_5_vl"}, ["qwen2_5_vl"]),
        ({"vision_config": {"hidden_size": 1536}}, ["1536", "3584"]),
        ({"use_sliding_window": True}, ["sliding"]),
    ],
)
def test_inconsistent_values_raise_with_the_values(change, words):
    with pytest.raises(ConfigError) as err:
        Qwen2VLConfig.from_hf_dict({**OFFICIAL_7B, **change})
    for w in words:
        assert w in str(err.value)


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Qwen2VLConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2VLConfig.from_file(tmp_path)


def test_frozen():
    cfg = Qwen2VLConfig.from_hf_dict(OFFICIAL_7B)
    with pytest.raises(AttributeError):
        cfg.text.hidden_size = 1  # type: ignore[misc]
