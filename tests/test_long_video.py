"""Long videos: refused or fitted before decoding, frames resized as they are decoded, memory bounded.

The fit uses the reference's own knobs (qwen-vl-utils' `total_pixels`, then `fps`), so a fitted conversation is
checked against the oracle run on the same fitted fields."""

from __future__ import annotations

import pytest
import torch

from processing_fixtures import oracle
from qwen2vl.processing import InputError
from qwen2vl.processing.media import MediaPolicy
from qwen2vl.processing.processor import Budget, OverBudget
from qwen2vl.processing.video import RgbConverter, _open, decode_frames, probe, resize_frames, sample_indices
from qwen2vl.testing.video import write_test_video
from test_cli import cli, tiny  # noqa: F401 (a fixture)
from test_server_hostile import RssPeak
from test_video_processing import check


@pytest.fixture(scope="module")
def two_minutes(tmp_path_factory):
    """A 2-minute 320x180 clip at 12 fps: 1,440 frames, 240 sampled at the default 2 fps."""
    return write_test_video(tmp_path_factory.mktemp("long") / "two.mp4", 120, size=(320, 180), fps=12, gop=60)


def user(video, **fields):
    return [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(video), **fields},
                {"type": "text", "text": "Summarise the video."},
            ],
        }
    ]


def test_chunked_decode_equals_decoding_everything_then_resizing(two_minutes):
    policy = MediaPolicy()
    with _open(str(two_minutes), policy, "v") as c:
        total, fps, height, width = probe(c, "v")
    indices = sample_indices({"fps": 0.5}, total, fps)
    indices = indices[:5] + [indices[5]] * 3 + indices[6:]  # repeats too
    # the plain path: every wanted frame at source size, one resize of the stack
    wanted, plain, to_rgb = set(indices), {}, RgbConverter()
    with _open(str(two_minutes), policy, "v") as c:
        for n, frame in enumerate(c.decode(video=0)):
            if n in wanted:
                plain[n] = torch.from_numpy(to_rgb(frame, (height, width))).permute(2, 0, 1)
    expected = resize_frames(torch.stack([plain[i] for i in indices]), 112, 196)
    for chunk_bytes in (1, 3 * height * width * 3, 2**30):  # one frame, three frames, everything per chunk
        with _open(str(two_minutes), policy, "v") as c:
            got = decode_frames(c, indices, "v", (112, 196), chunk_bytes=chunk_bytes)
        assert torch.equal(got, expected), chunk_bytes


def test_a_video_that_fits_is_unchanged(proc, two_minutes):
    conv = user(two_minutes)
    plain = proc(conv)
    fitted = proc(conv, fit=True, budget=Budget(plain["input_ids"].shape[1]))
    assert plain.keys() == fitted.keys() and all(torch.equal(plain[k], fitted[k]) for k in plain)
    assert proc.plan(conv, fit=True, budget=Budget(plain["input_ids"].shape[1])).items[0].fitted == {}


@pytest.mark.parametrize("limit, knob", [(3000, "total_pixels"), (1200, "fps"), (400, "fps")])
def test_fit_lowers_pixels_then_frame_rate_and_equals_the_reference(repo, proc, two_minutes, limit, knob):
    conv = user(two_minutes)
    assert proc.plan(conv).prompt_tokens > limit
    with pytest.raises(OverBudget):  # without fit: refused from the plan
        proc(conv, budget=Budget(limit))
    plan = proc.plan(conv, fit=True, budget=Budget(limit))
    item = plan.items[0]
    assert plan.prompt_tokens <= limit and knob in item.fitted
    ours = proc(conv, fit=True, budget=Budget(limit))
    assert ours["input_ids"].shape[1] == plan.prompt_tokens
    assert ours["video_grid_thw"][0].tolist()[0] * 2 == len(item.frame_indices)
    # the fitted fields are plain qwen-vl-utils fields: the reference given them gives the same tensors
    check(ours, oracle(repo, user(two_minutes, **item.fitted)))
    # the fit is the largest that fits: two more frames (or the next pixel budget up) would not
    fields = dict(item.fitted)
    if knob == "fps":
        grown = {**fields, "fps": fields["fps"] * (len(item.frame_indices) + 2) / len(item.frame_indices)}
    else:
        grown = {**fields, "total_pixels": int(fields["total_pixels"] * 1.15)}
    assert (
        proc.plan(user(two_minutes, **grown)).prompt_tokens > limit
        or proc.plan(user(two_minutes, **grown)).items[0].tokens == item.tokens
    )


def test_fit_refuses_what_cannot_fit(proc, two_minutes):
    with pytest.raises(OverBudget, match="fewest frames"):
        proc.plan(user(two_minutes), fit=True, budget=Budget(100))


def test_fit_keeps_an_items_own_nframes_knob(proc, two_minutes):
    plan = proc.plan(user(two_minutes, nframes=200), fit=True, budget=Budget(1500))
    assert "nframes" in plan.items[0].fitted and "fps" not in plan.items[0].fitted
    assert plan.prompt_tokens <= 1500


def test_fit_splits_the_budget_between_videos_and_leaves_images_alone(proc, two_minutes, tmp_path):
    from processing_fixtures import noise_image

    noise_image(200, 150).save(tmp_path / "p.png")
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(tmp_path / "p.png")},
                {"type": "video", "video": str(two_minutes)},
                {"type": "video", "video": str(two_minutes), "video_end": 30},
                {"type": "text", "text": "Compare."},
            ],
        }
    ]
    before = proc.plan(conv)
    plan = proc.plan(conv, fit=True, budget=Budget(2500))
    assert plan.prompt_tokens <= 2500 and plan.items[0] == before.items[0]
    assert all(item.fitted for item in plan.items[1:])


def test_preparing_a_long_video_holds_little_more_than_its_pixels(proc, two_minutes):
    """Peak memory while preparing = the float32 pixel rows (what the model takes) + the uint8 clip at its final
    size + bounded working space (one resize chunk): source frames are never all held at once, the rows are
    normalised in place, and one video's rows are not copied again into the batch."""
    with RssPeak() as rss:
        batch = proc(user(two_minutes, nframes=400))
    grew = rss.grew
    rows = batch["pixel_values_videos"]
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert t == 200
    clip = 400 * 3 * h * 14 * w * 14
    working = 160 * 2**20
    assert grew < rows.numel() * 4 + clip + working, (grew, rows.numel() * 4, clip)


def test_fit_needs_a_video(proc):
    with pytest.raises(InputError):
        proc([{"role": "user", "content": "word " * 40000}], fit=True, budget=Budget(1000))


# -- the command line and the Python API ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seven_minutes(tmp_path_factory):
    """Seven minutes at 4 fps: 768 frames sampled by default, ~55k tokens, more than the 32,768-token context."""
    return write_test_video(tmp_path_factory.mktemp("seven") / "seven.mp4", 420, size=(160, 90), fps=4, gop=40)


@pytest.fixture(scope="module")
def short_context(tiny, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    """`qwen2vl make-tiny`'s checkpoint with a 4,096-token context, so that a fitted prompt runs in seconds."""
    import json
    import shutil

    directory = tmp_path_factory.mktemp("short") / "tiny"
    shutil.copytree(tiny, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    return directory


def test_cli_fits_by_default_says_so_and_refuses_with_no_fit(short_context, seven_minutes):
    refused = cli(
        "run",
        "--model",
        short_context,
        "--video",
        seven_minutes,
        "--prompt",
        "Summarise.",
        "--no-fit",
        "--max-new-tokens",
        "2",
    )
    assert refused.returncode != 0
    error = [line for line in refused.stderr.splitlines() if line.startswith("qwen2vl: error")]
    assert len(error) == 1 and "tokens" in error[0] and "4096" in error[0], refused.stderr
    assert "decoding" not in refused.stderr  # refused from the plan, before any frame was decoded
    planned = cli("plan", "--model", short_context, "--video", seven_minutes, "--fit", "--max-new-tokens", "2")
    assert planned.returncode == 0 and "fitted: total_pixels=" in planned.stdout and "fps=" in planned.stdout
    ran = cli(
        "run", "--model", short_context, "--video", seven_minutes, "--prompt", "Summarise.", "--max-new-tokens", "2"
    )
    assert ran.returncode == 0, ran.stderr
    assert "qwen2vl: fitted video" in ran.stderr and "--no-fit" in ran.stderr


def test_pipeline_fit_is_off_by_default(short_context, seven_minutes):
    import qwen2vl

    pipe = qwen2vl.load(str(short_context), progress=False)
    conv = user(seven_minutes)
    with pytest.raises(OverBudget):
        pipe.chat(conv, max_new_tokens=2)
    batch = pipe.prepare([conv], pipe.params(max_new_tokens=100), fit=True)
    assert 4096 - 100 - 200 < batch["input_ids"].shape[1] <= 4096 - 100
    assert isinstance(pipe.chat(conv, max_new_tokens=2, fit=True), str)


def test_source_pixels_over_the_budget_are_refused_from_the_plan(proc, two_minutes):
    with pytest.raises(OverBudget) as refused:
        proc(user(two_minutes), budget=Budget(source_pixels=320 * 180 * 10))
    assert refused.value.resource == "pixels" and refused.value.tokens == 240 * 320 * 180
