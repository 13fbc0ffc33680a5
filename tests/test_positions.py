"""M-RoPE position ids against transformers 4.57 `get_rope_index` (the trained rule) and worked examples."""

from __future__ import annotations

import pytest
import torch

from qwen2vl.model.positions import PlaceholderMismatch, batch_mrope_positions, decode_positions, mrope_positions

VS, VE, IMG, VID = 151652, 151653, 151655, 151656
IDS = dict(image_token_id=IMG, video_token_id=VID)


def row(*parts):
    ids = []
    for p in parts:
        if isinstance(p, int):
            ids += [100 + i for i in range(p)]
        else:
            kind, (t, h, w) = p
            ids += [VS] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [VE]
    return ids


def test_worked_example():
    # 14 text tokens, vision_start, a 56x56 image (grid 1x4x4 -> 2x2 tokens), vision_end, 7 tokens
    ids = [1] * 14 + row(("image", (1, 4, 4))) + [1] * 7
    pos, delta = mrope_positions(ids, {IMG: iter([(1, 4, 4)]), VID: iter([])}, **IDS)
    assert pos[0].tolist() == list(range(15)) + [15, 15, 15, 15] + list(range(17, 25))
    assert pos[1].tolist() == list(range(15)) + [15, 15, 16, 16] + list(range(17, 25))
    assert pos[2].tolist() == list(range(15)) + [15, 16, 15, 16] + list(range(17, 25))
    assert delta == -2


def test_text_after_long_video_starts_after_its_last_frame():
    # video grid (8, 4, 4) after a 15-token prefix -> text after it starts at 23 (5.x would say 17)
    ids = [1] * 14 + row(("video", (8, 4, 4))) + [1] * 3
    pos, _ = mrope_positions(ids, {IMG: iter([]), VID: iter([(8, 4, 4)])}, **IDS)
    after = 14 + 1 + 8 * 2 * 2  # <|vision_end|>, the first text token after the video
    assert pos[:, after].tolist() == [23, 23, 23]


def _hf_rope_index():
    from transformers import Qwen2VLConfig, Qwen2VLModel

    cfg = Qwen2VLConfig(
        text_config=dict(
            vocab_size=200000,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=16),
    )
    with torch.device("meta"):
        model = Qwen2VLModel(cfg)
    return model.get_rope_index


@pytest.mark.parametrize("seed", range(6))
def test_batches_match_reference(seed):
    g = torch.Generator().manual_seed(seed)
    rows, images, videos = [], [], []
    for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
        parts = []
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            parts.append(int(torch.randint(0, 6, (1,), generator=g)))
            kind = "image" if torch.rand(1, generator=g) < 0.5 else "video"
            t = 1 if kind == "image" else int(torch.randint(1, 9, (1,), generator=g))
            h, w = (2 * int(torch.randint(1, 6, (1,), generator=g)) for _ in range(2))
            parts.append((kind, (t, h, w)))
            (images if kind == "image" else videos).append((t, h, w))
        parts.append(int(torch.randint(1, 6, (1,), generator=g)))
        rows.append(row(*parts))
    length = max(map(len, rows))
    input_ids = torch.tensor([[0] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    ig = torch.tensor(images) if images else None
    vg = torch.tensor(videos) if videos else None
    ours, deltas = batch_mrope_positions(input_ids, mask, ig, vg, **IDS)
    ref, ref_deltas = _hf_rope_index()(input_ids, ig, vg, mask)
    assert torch.equal(ours, ref)
    assert deltas.tolist() == ref_deltas.flatten().tolist()


def test_decode_positions_continue_after_the_prompt_max():
    ids = [1] * 3 + row(("video", (6, 2, 2))) + [1] * 2
    input_ids = torch.tensor([[0, 0] + ids])
    pos, deltas = batch_mrope_positions(
        input_ids, torch.tensor([[0, 0] + [1] * len(ids)]), None, torch.tensor([[6, 2, 2]]), **IDS
    )
    nxt = decode_positions(input_ids.shape[1], 2, deltas)
    assert nxt[:, 0].tolist() == [[int(pos.max()) + 1, int(pos.max()) + 2]] * 3


def test_mismatches_raise():
    with pytest.raises(PlaceholderMismatch, match="more image placeholder runs"):
        batch_mrope_positions(torch.tensor([row(("image", (1, 2, 2)))]), None, None, None, **IDS)
    with pytest.raises(PlaceholderMismatch, match="needs 4 consecutive"):
        batch_mrope_positions(torch.tensor([row(("image", (1, 2, 2)))]), None, torch.tensor([[1, 4, 4]]), None, **IDS)
    with pytest.raises(PlaceholderMismatch, match="more rows"):
        batch_mrope_positions(
            torch.tensor([row(("image", (1, 2, 2)))]), None, torch.tensor([[1, 2, 2]] * 2), None, **IDS
        )
