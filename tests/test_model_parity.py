"""Logits of our model against transformers 4.57 `Qwen2VLForConditionalGeneration`, float32 on CPU.

Inputs are built by hand here (placeholder runs, random pixel rows of the right shapes), so these tests depend on
neither processor. Limit: max |logit difference| <= 1e-4 over every non-padding position.
"""

from __future__ import annotations

import pytest
import torch

import qwen2vl
from model_inputs import CASES, build

LIMIT = 1e-4


def compare(ours, ref, batch, name, parity_report):
    with torch.no_grad():
        a = ours(**batch)
        b = ref(**batch).logits
    keep = batch["attention_mask"].bool()
    diff = (a.float() - b.float())[keep].abs().max().item()
    parity_report(name, diff, LIMIT)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_reference(case, tiny_ckpt, hf_model_factory, parity_report):
    ours = qwen2vl.load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    compare(ours, hf_model_factory(tiny_ckpt), build(CASES[case]), f"logits, {case}", parity_report)


def test_logits_match_reference_sdpa(tiny_ckpt, hf_model_factory, parity_report):
    ours = qwen2vl.load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    batch = build(CASES["left-padded batch: text / image / video"], seed=3)
    compare(
        ours, hf_model_factory(tiny_ckpt, attn="sdpa"), batch, "logits vs reference sdpa, padded batch", parity_report
    )


def test_tied_sharded_new_key_layout(tiny_tied_ckpt, hf_model_factory, parity_report):
    ours = qwen2vl.load_model(tiny_tied_ckpt, dtype=torch.float32, progress=False)
    assert ours.lm_head is None
    batch = build([[4, ("image", (1, 4, 8)), 6], [12]], seed=5)
    compare(
        ours, hf_model_factory(tiny_tied_ckpt), batch, "logits, tied + sharded + model.language_model.*", parity_report
    )


def test_vision_tower_alone(tiny_ckpt, hf_model_factory, parity_report):
    ours = qwen2vl.load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    ref = hf_model_factory(tiny_ckpt)
    grids = torch.tensor([[1, 6, 10], [4, 4, 8], [1, 2, 2]])
    pixels = torch.randn(int(grids.prod(-1).sum()), 1176, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a = ours.encode_vision(pixels, grids)
        b = ref.model.visual(pixels, grid_thw=grids)
    parity_report("vision tower features", (a - b).abs().max().item(), LIMIT)


def test_bfloat16_tracks_float32(tiny_ckpt, parity_report):
    f32 = qwen2vl.load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    # the plain PyTorch path in bf16, as on a GPU (on CPU the default is bf16 storage with float32 compute,
    # tested in test_cpu.py)
    bf16 = qwen2vl.load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False, cpu_kernels=False)
    assert bf16.dtype == torch.bfloat16
    batch = build(CASES["left-padded batch: text / image / video"], seed=11)
    with torch.no_grad():
        a, b = f32(**batch), bf16(**batch).float()
    keep = batch["attention_mask"].bool()
    scale = a[keep].abs().max().item()
    rel = (a - b)[keep].abs().max().item() / scale
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.0039); a few layers of rounding stay within a few steps
    parity_report("bf16 vs f32 logits, max |diff| / max |logit|", rel, 0.05)
    assert (a.argmax(-1)[keep] == b.argmax(-1)[keep]).float().mean() > 0.9
