"""Greedy decoding against transformers 4.57 `generate`, and the cache invariants of the decode loop."""

from __future__ import annotations

import pytest
import torch

import qwen2vl
from model_inputs import CASES, build
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.model import KVCache

NEW = 48
GEN_CASES = {
    "text only": CASES["text only"],
    "one image": CASES["one image"],
    "two images": CASES["two images, different aspect ratios"],
    "video": CASES["video with T > spatial, then text"],
    "mixed batch": CASES["left-padded batch: text / image / video"],
}


def ours_greedy(model, batch, new=NEW, **kw):
    steps = list(generate_steps(model, Prompt.from_batch(batch), greedy, new, **kw))
    return torch.stack([s.tokens for s in steps], dim=1)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return qwen2vl.load_model(tiny_ckpt, dtype=torch.float32, progress=False)


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_greedy_tokens_equal_reference_generate(case, model, tiny_ckpt, hf_model_factory):
    batch = build(GEN_CASES[case], seed=21)
    ref = hf_model_factory(tiny_ckpt, attn="sdpa")
    with torch.no_grad():
        out = ref.generate(
            **batch,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            repetition_penalty=1.0,
            top_k=None,
            top_p=None,
            temperature=None,
            pad_token_id=151643,
        )
    expected = out[:, batch["input_ids"].shape[1] :]
    got = ours_greedy(model, batch)
    assert torch.equal(got, expected)


def test_batched_rows_equal_rows_alone(model):
    rows = GEN_CASES["mixed batch"] + [[2, ("image", (1, 4, 10)), 3]]
    together = ours_greedy(model, build(rows, seed=4), new=24)
    # rebuild each row alone with the same random draws: build() draws tokens and pixels row by row in order
    full = build(rows, seed=4)
    keep = full["attention_mask"].bool()
    img_at, vid_at = 0, 0
    for r, parts in enumerate(rows):
        ids = full["input_ids"][r][keep[r]][None]
        single = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        n_img = sum(1 for p in parts if not isinstance(p, int) and p[0] == "image")
        n_vid = sum(1 for p in parts if not isinstance(p, int) and p[0] == "video")
        for kind, n, at in (("image", n_img, img_at), ("video", n_vid, vid_at)):
            if n:
                grids = full[f"{kind}_grid_thw"][at : at + n]
                sizes = full[f"{kind}_grid_thw"].prod(-1).tolist()
                lo = sum(sizes[:at])
                key = "pixel_values" if kind == "image" else "pixel_values_videos"
                single[key] = full[key][lo : lo + int(grids.prod(-1).sum())]
                single[f"{kind}_grid_thw"] = grids
        img_at += n_img
        vid_at += n_vid
        assert torch.equal(ours_greedy(model, single, new=24)[0], together[r]), f"row {r}"


def test_cached_decode_equals_full_forward(model):
    batch = build(GEN_CASES["mixed batch"], seed=8)
    tokens = ours_greedy(model, batch, new=6)
    ids = torch.cat([batch["input_ids"], tokens], dim=1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], dim=1)
    full = {**batch, "input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        logits = model(**full)
    # the greedy choice at each step is the argmax of the full forward at the previous position
    L = batch["input_ids"].shape[1]
    assert torch.equal(logits[:, L - 1 : -1].argmax(-1), tokens)


def test_prefix_reuse_equals_fresh_prefill(model):
    batch = build([[5, ("image", (1, 4, 6)), 9]], seed=9)
    fresh = ours_greedy(model, batch, new=8)
    L = batch["input_ids"].shape[1]
    cache = KVCache(model.config.text, 1, L + 8, model.dtype)
    with torch.no_grad():
        model(**batch, cache=cache)  # fills slots 0..L-1 with this prompt
    reused = torch.stack(
        [s.tokens for s in generate_steps(model, Prompt.from_batch(batch), greedy, 8, cache=cache, reuse=L - 3)], dim=1
    )
    assert torch.equal(fresh, reused)


def test_stops_on_stop_tokens_and_pads_finished_rows(model):
    batch = build([[10], [7]], seed=2)
    first = ours_greedy(model, batch, new=3)
    stop = int(first[0, 1])  # row 0's second token becomes a stop token
    steps = list(generate_steps(model, Prompt.from_batch(batch), greedy, 3, stop_token_ids=(stop,), pad_token_id=7))
    toks = torch.stack([s.tokens for s in steps], dim=1)
    assert toks[0, 1] == stop and steps[1].finished[0]
    assert len(steps) == 3 and not steps[2].finished[1]  # row 1 runs on, so row 0 must be padded at step 3
    assert toks[0, 2] == 7
