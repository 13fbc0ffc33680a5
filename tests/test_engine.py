"""The continuous-batching engine: every request gets what it would get alone, whatever shares the batch."""

from __future__ import annotations

import time

import pytest
import torch

import qwen2vl
from model_inputs import build
from qwen2vl.engine.engine import Engine, QueueFull, Request
from qwen2vl.generate.decode import Prompt, generate_steps, greedy


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from qwen2vl.testing.checkpoint import make_config, write_checkpoint

    d = write_checkpoint(tmp_path_factory.mktemp("eng"), make_config(), seed=6, dtype=torch.bfloat16, tokenizer=False)
    return qwen2vl.load_model(d, progress=False)  # bf16 weights, float32 compute, CPU kernels


MIXED = [
    [30],
    [4, ("image", (1, 6, 8)), 6],
    [3, ("video", (4, 4, 4)), 8],
    [2, ("image", (1, 4, 10)), 5],
    [12],
    [5, ("image", (1, 8, 8)), 2, ("image", (1, 4, 4)), 3],
    [7],
    [3, ("video", (2, 6, 4)), 2],
    [20],
    [4, ("image", (1, 2, 2)), 9],
    [9],
    [6, ("image", (1, 10, 6)), 1],
    [15],
    [2, ("video", (6, 2, 2)), 4],
    [40],
    [5, ("image", (1, 6, 6)), 5],
]


def single(rows, i, seed):
    """Request i of the batch `build(rows, seed)` alone, with exactly its own tokens and pixels."""
    full = build(rows, seed=seed)
    keep = full["attention_mask"][i].bool()
    ids = full["input_ids"][i][keep][None]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grids = full.get(f"{kind}_grid_thw")
        if grids is None:
            continue
        counts = [sum(1 for p in r if not isinstance(p, int) and p[0] == kind) for r in rows]
        lo = sum(counts[:i])
        if counts[i]:
            sizes = grids.prod(-1).tolist()
            start = sum(sizes[:lo])
            n = sum(sizes[lo : lo + counts[i]])
            out[key] = full[key][start : start + n]
            out[f"{kind}_grid_thw"] = grids[lo : lo + counts[i]]
    return out


def run(engine, batches, new, ids=None, stop=()):
    for j, b in enumerate(batches):
        engine.add(Request(ids[j] if ids else f"r{j}", Prompt.from_batch(b), greedy, new, stop))
    got: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            if out.token is not None:
                got.setdefault(out.request_id, []).append(out.token)
    return got


def test_sixteen_concurrent_requests_equal_each_alone(model):
    prompts = [single(MIXED, i, seed=31) for i in range(len(MIXED))]
    together = run(Engine(model, max_num_seqs=16, max_model_len=256, prefill_chunk=32), prompts, 12)
    for i, p in enumerate(prompts):
        alone = run(Engine(model, max_num_seqs=1, max_model_len=256, prefill_chunk=32), [p], 12)["r0"]
        assert together[f"r{i}"] == alone, f"request {i}"
        # and, prefilled in one chunk (identical arithmetic), the same as the single-request generation loop
        ref = [int(s.tokens[0]) for s in generate_steps(model, Prompt.from_batch(p), greedy, 12)]
        one_chunk = run(Engine(model, max_num_seqs=1, max_model_len=256, prefill_chunk=256), [p], 12)["r0"]
        assert one_chunk == ref, f"request {i} vs generate_steps"


def test_fewer_slots_than_requests_queue_up(model):
    prompts = [single(MIXED, i, seed=32) for i in range(6)]
    engine = Engine(model, max_num_seqs=2, max_model_len=256, prefill_chunk=32)
    got = run(engine, prompts, 5)
    assert sorted(got) == [f"r{i}" for i in range(6)] and all(len(v) == 5 for v in got.values())
    assert engine.pool.slots == 2 and len(engine.free_slots) == 2


def test_prefix_reuse_is_exact_and_respects_pictures(model):
    rows = [[70, ("image", (1, 4, 4)), 9]]
    a = single(rows, 0, seed=40)
    b = {**a, "pixel_values": torch.randn_like(a["pixel_values"])}  # same tokens, another picture
    engine = Engine(model, max_num_seqs=1, max_model_len=256, prefill_chunk=32)
    first = run(engine, [a], 6)["r0"]
    again = run(engine, [a], 6)["r0"]
    assert engine.prefix_tokens_reused == 64 and again == first
    other = run(engine, [b], 6)["r0"]
    fresh = run(Engine(model, max_num_seqs=1, max_model_len=256, prefill_chunk=32), [b], 6)["r0"]
    assert other == fresh
    assert engine.prefix_tokens_reused == 64 + 64  # the text before the image again, not the image
    assert engine.vision_cache.hits == 1


def test_abort_frees_the_slot_and_queue_limit(model):
    p = single([[10]], 0, seed=1)
    engine = Engine(model, max_num_seqs=1, max_model_len=64, prefill_chunk=32, max_waiting=2)
    engine.add(Request("a", Prompt.from_batch(p), greedy, 50))
    engine.add(Request("b", Prompt.from_batch(p), greedy, 3))
    with pytest.raises(QueueFull):
        engine.add(Request("c", Prompt.from_batch(p), greedy, 3))
    engine.step()
    engine.abort("a")
    reasons = {}
    while engine.has_work():
        for out in engine.step():
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
    assert reasons == {"a": "abort", "b": "length"}


def test_a_failing_request_does_not_harm_others(model):
    good = single([[10]], 0, seed=2)
    bad = {
        **good,
        "input_ids": torch.cat([good["input_ids"], torch.tensor([[151655] * 4])], 1),
        "attention_mask": torch.ones(1, good["input_ids"].shape[1] + 4, dtype=torch.long),
    }  # pads, no image
    engine = Engine(model, max_num_seqs=2, max_model_len=64, prefill_chunk=32)
    engine.add(Request("bad", Prompt.from_batch(bad), greedy, 3))
    engine.add(Request("good", Prompt.from_batch(good), greedy, 3))
    outs = []
    while engine.has_work():
        outs += engine.step()
    errors = [o for o in outs if o.finish_reason == "error"]
    assert [o.request_id for o in errors] == ["bad"] and "image" in errors[0].error
    assert len([o for o in outs if o.request_id == "good" and o.token is not None]) == 3


def test_prompt_longer_than_context_is_refused(model):
    p = single([[70]], 0, seed=3)
    with pytest.raises(ValueError, match="70 tokens"):
        Engine(model, max_num_seqs=1, max_model_len=64).add(Request("x", Prompt.from_batch(p), greedy, 3))


# -- fairness: a large vision encode runs in pieces between decode steps --------------------------------------------


def encode_in_pieces(model, pixels, grid, piece_flops):
    """(features, number of pauses) of model.encode_vision_pieces run to the end."""
    pieces, pauses = model.encode_vision_pieces(pixels, grid, piece_flops), 0
    while True:
        try:
            next(pieces)
        except StopIteration as done:
            return done.value, pauses
        pauses += 1


@pytest.mark.parametrize(
    "weights", ["bf16 storage, float32 CPU kernels", "bf16 storage, bf16 products", "float32 plain"]
)
def test_vision_in_pieces_is_bit_identical_to_one_shot(model, tiny_ckpt, weights):
    """The fast path's plain twin: however the encode is cut - whole blocks, row ranges, attention by segment
    groups, heads or query rows, the merger in ranges - the features are torch.equal to encode_vision. Under bf16
    products the vision attention is the CPU's bf16 attention kernel where it runs (AVX-512 BF16)."""
    if weights == "bf16 storage, float32 CPU kernels":
        m = model
    elif weights == "bf16 storage, bf16 products":
        m = qwen2vl.load_model(tiny_ckpt, dtype=torch.bfloat16, progress=False, cpu_matmul="bf16")
    else:
        m = qwen2vl.load_model(tiny_ckpt, dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(50)
    grids = {
        "image, 2048 patches": [[1, 64, 32]],
        "video, 4 frames of 512": [[4, 16, 32]],
        "image + video": [[1, 6, 8], [3, 20, 24]],
        "2x2 image": [[1, 2, 2]],
    }
    for name, grid in grids.items():
        grid = torch.tensor(grid)
        pixels = torch.randn(int(grid.prod(-1).sum()), 1176, generator=g)
        with torch.inference_mode():
            whole = m.encode_vision(pixels, grid)
            pauses = []
            for piece_flops in (1e12, 2e7, 2e6, 1):  # one piece ... every unit its own piece
                got, n = encode_in_pieces(m, pixels, grid, piece_flops)
                assert torch.equal(got, whole), f"{name}, piece_flops {piece_flops:g}"
                pauses.append(n)
        assert pauses[0] == 0 and pauses == sorted(pauses), (name, pauses)
        if grid.prod(-1).sum() >= 1024:  # large enough for blocks cut into row and query ranges
            assert pauses[-1] > 20 * m.config.vision.depth, (name, pauses)


def spy_on_pieces(model, monkeypatch, after_piece=lambda count: None):
    """Count the pieces of every vision encode the engine runs; after_piece(count) runs after each one."""
    original, log = model.encode_vision_pieces, {"pieces": 0, "closed": 0}

    def pieces(*args):
        inner = original(*args)
        try:
            while True:
                try:
                    next(inner)
                except StopIteration as done:
                    return done.value
                log["pieces"] += 1
                after_piece(log["pieces"])
                yield
        finally:  # runs when the encode ends, or when the engine drops a half-done one
            log["closed"] += 1

    monkeypatch.setattr(model, "encode_vision_pieces", pieces)
    return log


def big_image_prompt(seed):
    return single([[6, ("image", (1, 64, 32)), 4]], 0, seed=seed)  # 2048 patches, 512 image tokens


def test_running_streams_get_a_token_every_step_during_a_large_encode(model, monkeypatch):
    text, big = single([[10]], 0, seed=60), big_image_prompt(61)
    alone = {
        name: run(Engine(model, max_num_seqs=1, max_model_len=640, prefill_chunk=32), [p], n)["r0"]
        for name, p, n in (("text", text, 200), ("big", big, 3))
    }
    log = spy_on_pieces(model, monkeypatch)
    engine = Engine(
        model, max_num_seqs=2, max_model_len=640, prefill_chunk=32, prompt_budget_s=0.0, vision_piece_flops=1e7
    )
    engine.add(Request("text", Prompt.from_batch(text), greedy, 200))
    got, steps_beside = {"text": [], "big": []}, 0
    while engine.has_work():
        if len(got["text"]) == 5:
            engine.add(Request("big", Prompt.from_batch(big), greedy, 3))
        beside = [r.request_id for r in engine.running] == ["text"] and engine.prefilling
        outs = engine.step()
        for out in outs:
            if out.token is not None:
                got[out.request_id].append(out.token)
        if beside:  # text decoding while the image is encoded and prefilled: a token for text every step
            steps_beside += 1
            assert [o.request_id for o in outs if o.token is not None][-1] == "text"
    assert got == alone  # and the pieces changed nobody's tokens
    assert log["pieces"] > 30 and steps_beside > log["pieces"]  # every piece in a step of its own, beside text


def test_small_request_behind_a_large_encode_is_not_kept_waiting(model, monkeypatch):
    spy_on_pieces(model, monkeypatch)
    engine = Engine(
        model, max_num_seqs=2, max_model_len=640, prefill_chunk=32, prompt_budget_s=0.0, vision_piece_flops=2e6
    )
    engine.add(Request("big", Prompt.from_batch(big_image_prompt(62)), greedy, 2))
    engine.add(Request("small", Prompt.from_batch(single([[12]], 0, seed=63)), greedy, 2))
    order = []
    while engine.has_work():
        order += [o.request_id for o in engine.step() if o.token is not None]
    assert order.index("small") < order.index("big") and order.index("small") <= 2


def test_abort_in_the_middle_of_an_encode_stops_it_within_one_piece(model, monkeypatch):
    engine = Engine(
        model, max_num_seqs=2, max_model_len=640, prefill_chunk=32, prompt_budget_s=10.0, vision_piece_flops=2e6
    )
    running = []

    def after_piece(count):
        running.append(engine.stats()["step_running_s"])
        if count == 5:
            engine.abort("big")  # the server's call when the client goes; here it lands between two pieces

    log = spy_on_pieces(model, monkeypatch, after_piece)
    text = single([[10]], 0, seed=64)
    engine.add(Request("text", Prompt.from_batch(text), greedy, 6))
    engine.add(Request("big", Prompt.from_batch(big_image_prompt(65)), greedy, 3))
    outs = engine.step()  # a generous budget: without the abort this one step would run the whole encode
    assert log == {"pieces": 5, "closed": 1}  # not one piece after the abort, and its state is dropped
    assert [o.finish_reason for o in outs if o.request_id == "big"] == ["abort"]
    assert engine.free_slots == [1] and not engine.prefilling
    assert all(t > 0 for t in running)  # stats() seen from inside the step
    got = [o.token for o in outs if o.request_id == "text"]
    while engine.has_work():
        got += [o.token for o in engine.step() if o.request_id == "text"]
    assert got == run(Engine(model, max_num_seqs=1, max_model_len=640, prefill_chunk=32), [text], 6)["r0"]
    assert sorted(engine.free_slots) == [0, 1] and log["pieces"] == 5


def test_stats_report_step_durations_for_a_health_check(model):
    engine = Engine(model, max_num_seqs=1, max_model_len=64, prefill_chunk=32)
    s = engine.stats()
    assert s["step_running_s"] == 0.0 and s["since_last_step_s"] is None and s["longest_step_s"] == 0.0
    durations = []
    engine.add(Request("a", Prompt.from_batch(single([[10]], 0, seed=66)), greedy, 3))
    while engine.has_work():
        t = time.monotonic()
        engine.step()
        durations.append(time.monotonic() - t)
    s = engine.stats()
    assert s["step_running_s"] == 0.0 and 0.0 <= s["since_last_step_s"] < 60
    assert 0.0 < s["longest_step_s"] <= max(durations)
