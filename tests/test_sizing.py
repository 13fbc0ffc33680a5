"""The processor's pixel bounds applied as the reference applies them: qwen-vl-utils sizes every item with its own
defaults (or the item's fields), then transformers' processor sizes it again with the checkpoint's bounds, as
`AutoProcessor.from_pretrained(path, min_pixels=..., max_pixels=...)` leaves them. Named cases from the issue, the
option that lets those keywords reach videos, tensors as images, hub ids, and a seeded sweep over random sizes,
checkpoint bounds, keywords and per-item fields, each case run through the reference and through us."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from processing_fixtures import make_video, noise_image, oracle
from qwen2vl.processing import InputError, Processor
from qwen2vl.processing.image import IMAGE_STD
from qwen2vl.processing.sizing import Bounds, ProcessorBounds, image_size
from qwen2vl.processing.video import plan_video
from qwen2vl.testing.tokenizer_files import PREPROCESSOR_CONFIG
from qwen2vl.testing.video import encode_video, sharp_frames

GREY_LEVEL = 1.0 / (255 * min(IMAGE_STD))  # one grey level, in normalised units
TWO_GREY_LEVELS = 2 * GREY_LEVEL + 1e-5  # 0.030: the bar for videos (PyAV vs torchcodec decoding)
EXACT = 1e-5  # images: the same resize kernels on both sides, so equal up to float normalisation


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def checkpoint(repo, directory, config=None, video_config=None):
    """A tokenizer-only checkpoint directory whose preprocessor_config.json carries `config`'s bounds (None: the
    official 3136..12845056) and, given `video_config`, a video_preprocessor_config.json."""
    directory.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.json"):
        (directory / name).symlink_to(repo / name)
    common = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k not in ("min_pixels", "max_pixels")}
    bounds = {"min_pixels": 3136, "max_pixels": 12845056} if config is None else config
    (directory / "preprocessor_config.json").write_text(json.dumps({**common, **bounds}))
    if video_config is not None:
        common = {k: v for k, v in common.items() if k != "image_processor_type"}
        (directory / "video_preprocessor_config.json").write_text(
            json.dumps({**common, "video_processor_type": "Qwen2VLVideoProcessor", **video_config})
        )
    return directory


def compare(ours, ref) -> dict[str, float]:
    """Ids and grids equal; the largest pixel difference per kind (the caller judges it)."""
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    diffs = {}
    for kind, pix, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        assert (pix in ours) == (pix in ref)
        if pix in ref:
            assert ours[grid].tolist() == ref[grid].tolist()
            assert ours[pix].shape == ref[pix].shape
            diffs[kind] = (ours[pix] - ref[pix]).abs().max().item()
    return diffs


@pytest.fixture(autouse=True)
def fast_loading(repo, monkeypatch):
    """Every checkpoint here has the same tokenizer files: load them once on each side. And skip the
    0.7 s `repr` of the whole processor (tokenizer included) that transformers formats for a log line it drops."""
    import transformers

    from qwen2vl.processing import processor as processor_module
    from qwen2vl.processing.tokenizer import Tokenizer

    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(repo)
    ours = Tokenizer(repo / "tokenizer.json")
    monkeypatch.setattr(type(ref_tokenizer), "from_pretrained", classmethod(lambda cls, *a, **k: ref_tokenizer))
    monkeypatch.setattr(transformers.ProcessorMixin, "__repr__", lambda self: type(self).__name__)
    monkeypatch.setattr(processor_module, "Tokenizer", lambda path: ours)


@pytest.fixture(scope="module")
def clip_840x560(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("clip") / "c.mp4", frames=8, fps=4, size=(840, 560))


def image_file(tmp_path, width, height, seed=0):
    path = tmp_path / f"img{width}x{height}.png"
    noise_image(width, height, seed=seed).save(path)
    return str(path)


# -- the cases ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bounds, size, grid",
    [
        ((3136, 200704), (904, 503), [1, 24, 42]),  # qwen-vl-utils first sizes by its defaults, then the bounds
        ((100, 150), (645, 934), [1, 2, 2]),  # bounds below any 28x28 multiple: the reference's floor of 28
        ((56 * 56, 1280 * 28 * 28), (1024, 1024), [1, 70, 70]),  # the README's bounds: a second resize
    ],
)
def test_checkpoint_bounds_apply_after_qwen_vl_utils(bounds, size, grid, repo, tmp_path):
    d = checkpoint(repo, tmp_path / "ckpt", {"min_pixels": bounds[0], "max_pixels": bounds[1]})
    conv = user({"type": "image", "image": image_file(tmp_path, *size)}, {"type": "text", "text": "?"})
    ref = oracle(d, conv)
    assert ref["image_grid_thw"].tolist() == [grid]
    assert compare(Processor.from_pretrained(d)(conv), ref)["image"] <= EXACT


def test_item_max_below_the_processor_min_resizes_twice(repo, proc, tmp_path):
    conv = user(
        {"type": "image", "image": image_file(tmp_path, 200, 120), "max_pixels": 5000}, {"type": "text", "text": "?"}
    )
    ref = oracle(repo, conv)
    assert ref["image_grid_thw"].tolist() == [[1, 4, 8]]  # 200x120 -> 84x28 (PIL) -> 112x56 (torch)
    assert compare(proc(conv), ref)["image"] <= EXACT


def test_item_min_above_the_processor_max_is_accepted(repo, tmp_path):
    d = checkpoint(repo, tmp_path / "ckpt", {"min_pixels": 3136, "max_pixels": 200704})
    conv = user(
        {"type": "image", "image": image_file(tmp_path, 300, 200), "min_pixels": 400000}, {"type": "text", "text": "?"}
    )
    ref = oracle(d, conv)  # the item's bounds drive the first resize, the checkpoint's the second
    assert compare(Processor.from_pretrained(d)(conv), ref)["image"] <= EXACT


def test_video_is_resized_again_in_float(repo, tmp_path, clip_840x560):
    d = checkpoint(repo, tmp_path / "ckpt", {"min_pixels": 3136, "max_pixels": 200704})
    conv = user({"type": "video", "video": str(clip_840x560), "nframes": 4}, {"type": "text", "text": "?"})
    ref = oracle(d, conv)
    assert ref["video_grid_thw"].tolist() == [[2, 26, 38]]
    assert compare(Processor.from_pretrained(d)(conv), ref)["video"] <= GREY_LEVEL  # docs/processing.md's promise


def test_from_pretrained_bounds_skip_videos_as_in_the_reference(repo, tmp_path, clip_840x560):
    conv = user(
        {"type": "image", "image": image_file(tmp_path, 904, 503)},
        {"type": "video", "video": str(clip_840x560), "nframes": 4},
        {"type": "text", "text": "?"},
    )
    bounds = {"min_pixels": 3136, "max_pixels": 200704}
    ref = oracle(repo, conv, **bounds)
    assert ref["image_grid_thw"].tolist() == [[1, 24, 42]] and ref["video_grid_thw"].tolist() == [[2, 40, 60]]
    diffs = compare(Processor.from_pretrained(repo, **bounds)(conv), ref)
    assert diffs["image"] <= EXACT and diffs["video"] <= TWO_GREY_LEVELS
    # the explicit option: the keywords bound videos too, as a checkpoint whose file carries those bounds does
    reaching = Processor.from_pretrained(repo, **bounds, overrides_reach_videos=True)
    ref = oracle(checkpoint(repo, tmp_path / "ckpt", bounds), conv)
    assert ref["video_grid_thw"].tolist() == [[2, 26, 38]]
    diffs = compare(reaching(conv), ref)
    assert diffs["image"] <= EXACT and diffs["video"] <= TWO_GREY_LEVELS


@pytest.mark.parametrize("layout", ["CHW uint8", "HWC uint8", "CHW float", "HWC float", "1HW float", "HWC numpy float"])
def test_tensor_images_as_transformers_reads_them(layout, repo, tmp_path):
    hwc = torch.from_numpy(np.asarray(noise_image(301, 187, seed=5)).copy())  # (187, 301, 3) uint8
    pixels = {
        "CHW uint8": hwc.permute(2, 0, 1),
        "HWC uint8": hwc,
        "CHW float": hwc.permute(2, 0, 1) / 255.0,
        "HWC float": hwc / 255.0,
        "1HW float": hwc[..., :1].permute(2, 0, 1) / 255.0,
        "HWC numpy float": (hwc.numpy() / 255.0).astype(np.float32),
    }[layout]
    d = checkpoint(repo, tmp_path / "ckpt", {"min_pixels": 3136, "max_pixels": 20000})
    conv = user({"type": "image", "image": pixels, "max_pixels": 30000}, {"type": "text", "text": "?"})
    ref = oracle(d, conv)
    assert compare(Processor.from_pretrained(d)(conv), ref)["image"] <= EXACT


def test_tensor_values_outside_both_ranges_are_refused(proc):
    with pytest.raises(InputError, match=r"values span \[0.0, 2.5\]"):
        proc(user({"type": "image", "image": torch.linspace(0, 2.5, 3 * 40 * 40).reshape(3, 40, 40)}))
    with pytest.raises(InputError, match="not \\(H, W\\), \\(C, H, W\\)"):
        proc(user({"type": "image", "image": torch.zeros(5, 40, 40, dtype=torch.uint8)}))


def test_bounds_from_files_and_keywords_follow_transformers():
    # the rules ProcessorBounds.from_configs mirrors, on the configurations that tell them apart
    file = {"min_pixels": 1000, "max_pixels": 9000}
    assert ProcessorBounds.from_configs(file) == ProcessorBounds(Bounds(1000, 9000), Bounds(1000, 9000))
    assert ProcessorBounds.from_configs(file, max_pixels=600000) == ProcessorBounds(
        Bounds(1000, 600000), Bounds(1000, 9000)
    )
    size = {"shortest_edge": 700, "longest_edge": 700000}
    assert ProcessorBounds.from_configs(file, size=size) == ProcessorBounds(Bounds(1000, 9000), Bounds(700, 700000))
    assert ProcessorBounds.from_configs({}) == ProcessorBounds(Bounds(3136, 1003520), Bounds(100352, 602112))
    # a file with max_pixels only: its min_pixels attribute is unset, so one keyword alone leaves `size` in charge
    assert ProcessorBounds.from_configs({"max_pixels": 7000}, max_pixels=600000) == ProcessorBounds(
        Bounds(3136, 7000), Bounds(100352, 7000)
    )
    assert ProcessorBounds.from_configs({"max_pixels": 7000}, min_pixels=500) == ProcessorBounds(
        Bounds(500, 7000), Bounds(100352, 7000)
    )
    with pytest.raises(InputError, match="needs shortest_edge and longest_edge"):
        ProcessorBounds.from_configs({"size": {"height": 224, "width": 224}})


def test_hub_id_with_keywords(repo, tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny-vl" / "snapshots" / ("0" * 40)
    checkpoint(repo, snapshot)
    (snapshot / "config.json").write_text("{}")
    (cache / "models--org--tiny-vl" / "refs").mkdir()
    (cache / "models--org--tiny-vl" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    p = Processor.from_pretrained("org/tiny-vl", min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    assert p.bounds == ProcessorBounds(Bounds(256 * 28 * 28, 1280 * 28 * 28), Bounds(3136, 12845056))


def test_cli_plan_sizes_as_the_reference(repo, tmp_path, capsys):
    from qwen2vl.cli import main

    d = checkpoint(repo, tmp_path / "ckpt", {"min_pixels": 3136, "max_pixels": 200704})
    (d / "config.json").write_text("{}")
    image = image_file(tmp_path, 904, 503)
    assert main(["plan", "--model", str(d), "--image", image, "--json"]) == 0
    item = json.loads(capsys.readouterr().out)["items"][0]
    _, h, w = oracle(d, user({"type": "image", "image": image}))["image_grid_thw"][0].tolist()
    assert item["tokens"] == h * w // 4 == 252 and item["resized_size"] == [w * 14, h * 14]  # 896x504, then 588x336


# -- the sweep -----------------------------------------------------------------------------------------------------


def _pixels(rng, low, high) -> int:
    """Log-uniform in [low, high]: small and large bounds equally likely."""
    return int(np.exp(rng.uniform(np.log(low), np.log(high))))


def _bounds(rng):
    a, b = _pixels(rng, 50, 400000), _pixels(rng, 50, 3000000)
    return min(a, b), max(a, b)


def _config(rng):
    lo, hi = _bounds(rng)
    return [
        {"min_pixels": lo, "max_pixels": hi},
        {"min_pixels": lo // 40 + 1, "max_pixels": hi // 400 + 1},
        {"size": {"shortest_edge": lo, "longest_edge": hi}},
        {"max_pixels": hi},
        {},
        {"min_pixels": 3136, "max_pixels": 12845056},
    ][rng.integers(6)]


def _keywords(rng):
    lo, hi = _bounds(rng)
    return [
        {},
        {},
        {"min_pixels": lo, "max_pixels": hi},
        {"max_pixels": hi},
        {"min_pixels": lo},
        {"size": {"shortest_edge": lo, "longest_edge": hi}},
    ][rng.integers(6)]


def _item_fields(rng):
    return [
        {},
        {},
        {"max_pixels": _pixels(rng, 2500, 2000000)},
        {"min_pixels": _pixels(rng, 3136, 2000000)},
        {"resized_height": _pixels(rng, 20, 1200), "resized_width": _pixels(rng, 20, 1200)},
        {"min_pixels": _pixels(rng, 3136, 40000), "max_pixels": _pixels(rng, 40000, 1000000)},
    ][rng.integers(6)]


def _image(rng, seed):
    pil = noise_image(_pixels(rng, 16, 1600), _pixels(rng, 16, 1600), seed=seed)
    hwc = torch.from_numpy(np.asarray(pil).copy())
    return [pil, pil, pil, hwc.permute(2, 0, 1), hwc / 255.0][rng.integers(5)]


def _case(rng, clips, seed):
    parts = [
        {"type": "image", "image": _image(rng, seed * 10 + i), **_item_fields(rng)} for i in range(rng.integers(0, 3))
    ]
    if not parts or rng.random() < 0.4:
        frames = [{"nframes": 2}, {"nframes": 4}, {}][rng.integers(3)]
        fields = [{}, {"max_pixels": _pixels(rng, 90000, 600000)}, {"min_pixels": _pixels(rng, 3136, 300000)}][
            rng.integers(3)
        ]
        parts.append({"type": "video", "video": str(clips[rng.integers(len(clips))]), **frames, **fields})
    video_config = {"size": dict(zip(("shortest_edge", "longest_edge"), _bounds(rng)))} if rng.random() < 0.2 else None
    return _config(rng), video_config, _keywords(rng), user(*parts, {"type": "text", "text": "Describe."})


def test_sweep_against_the_reference(repo, tmp_path, parity_report):
    rng = np.random.default_rng(12)
    clips = [
        make_video(tmp_path / f"clip{w}x{h}.mp4", frames=8, fps=4, size=(w, h))
        for w, h in ((120, 90), (360, 240), (840, 560))
    ]
    # sharp colour edges, where decoders' colour conversions differ most: 10-bit BT.709, and 4:2:0 of odd height
    clips += [
        encode_video(
            tmp_path / "sharp10.mkv",
            sharp_frames((360, 240), 8, seed=1),
            (360, 240),
            4,
            gop=None,
            pix_fmt="yuv420p10le",
            colorspace=1,
        ),
        encode_video(tmp_path / "sharp_odd.mkv", sharp_frames((201, 151), 8, seed=2), (201, 151), 4, "ffv1", gop=None),
    ]
    cases, compared, refused, worst = 60, 0, 0, {"image": 0.0, "video": 0.0}
    second_resizes = {"image": 0, "video": 0}  # items whose size the processor's bounds changed
    used = set()  # clips compared
    for n in range(cases):
        config, video_config, keywords, conv = _case(rng, clips, n)
        d = checkpoint(repo, tmp_path / f"ckpt{n}", config, video_config)
        context = f"case {n}: config {config}, video config {video_config}, keywords {keywords}, items " + str(
            [{k: v for k, v in p.items() if k not in ("image", "text")} for p in conv[0]["content"]]
        )
        try:
            ref = oracle(d, conv, **keywords)
        except Exception:  # the reference refuses (a qwen-vl-utils assert, a zero size): so must we
            with pytest.raises(InputError):
                Processor.from_pretrained(d, **keywords)(conv)
            refused += 1
            continue
        proc = Processor.from_pretrained(d, **keywords)
        ours = proc(conv)
        try:
            for kind, diff in compare(ours, ref).items():
                worst[kind] = max(worst[kind], diff)
                assert diff <= {"image": EXACT, "video": TWO_GREY_LEVELS}[kind], f"{kind} pixels differ by {diff}"
            plan = proc.plan(conv)  # the token budget follows the same two-step rule, decoding nothing
            grids = (
                ref.get("image_grid_thw", torch.zeros(0, 3)).tolist()
                + ref.get("video_grid_thw", torch.zeros(0, 3)).tolist()
            )
            kinds = [p["type"] for p in conv[0]["content"] if p["type"] != "text"]
            order = sorted(range(len(kinds)), key=lambda i: kinds[i] != "image")  # images' grids come first
            assert [plan.items[i].tokens for i in order] == [int(t * h * w) // 4 for t, h, w in grids]
            assert plan.prompt_tokens == ref["input_ids"].shape[1]
        except AssertionError as e:
            raise AssertionError(f"{context}: {e}") from None
        compared += 1
        used.update(p["video"] for p in conv[0]["content"] if p["type"] == "video")
        for part, item in zip([p for p in conv[0]["content"] if p["type"] != "text"], plan.items):
            w, h = item.source_size
            first = image_size(part, h, w) if item.kind == "image" else plan_video(part, proc.policy).resized
            second_resizes[item.kind] += first != item.resized_size[::-1]
    assert compared >= 0.8 * cases, f"only {compared} of {cases} cases ran through the reference ({refused} refused)"
    assert refused >= 1 and min(second_resizes.values()) >= 5, (refused, second_resizes)  # the sweep reaches both
    assert used == {str(c) for c in clips}, f"clips never compared: {set(map(str, clips)) - used}"
    parity_report("sizing sweep: image pixels vs reference", worst["image"], EXACT)
    parity_report("sizing sweep: video pixels vs reference", worst["video"], TWO_GREY_LEVELS)
