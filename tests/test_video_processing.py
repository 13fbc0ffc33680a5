"""Videos against qwen-vl-utils 0.0.14 (torchcodec reader) + transformers 4.57.6: files of several containers,
variable frame rate, clip windows, frame lists with an odd count, arrays; and the decoder's bad-input errors."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from processing_fixtures import make_video, noise_image, oracle
from qwen2vl.processing import InputError
from qwen2vl.processing.image import IMAGE_STD
from qwen2vl.processing.media import MediaPolicy
from qwen2vl.processing.video import plan_video, sample_indices

GREY_LEVEL = 1.0 / (255 * min(IMAGE_STD)) + 1e-5  # one grey level, in normalised units


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def check(ours, ref):
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    diff = (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max().item()
    assert diff <= GREY_LEVEL, f"{diff} exceeds one grey level ({GREY_LEVEL})"


@pytest.mark.parametrize(
    "suffix, codec, extra",
    [
        ("mp4", "mpeg4", {}),
        ("mkv", "mpeg4", {"fps": 1.0}),
        ("avi", "mpeg4", {"nframes": 7}),
        ("webm", "libvpx-vp9", {"max_pixels": 150000}),
        ("mp4", "mpeg4", {"video_start": 0.5, "video_end": 2.2}),
        ("mp4", "mpeg4", {"min_frames": 8, "total_pixels": 800000}),
    ],
)
def test_video_files_equal_reference(suffix, codec, extra, repo, proc, tmp_path):
    if codec not in av.codecs_available:
        pytest.fail(f"PyAV lacks the {codec} encoder needed to build this test's clip")
    path = make_video(tmp_path / f"clip.{suffix}", codec=codec)
    conv = user({"type": "video", "video": str(path), **extra}, {"type": "text", "text": "What happens?"})
    check(proc(conv), oracle(repo, conv))


def test_variable_frame_rate(repo, proc, tmp_path):
    path = make_video(tmp_path / "vfr.mp4", frames=40, vfr=True)
    conv = user({"type": "video", "video": str(path)}, {"type": "text", "text": "?"})
    check(proc(conv), oracle(repo, conv))


def test_sampled_indices_equal_reference():
    from qwen_vl_utils.vision_process import smart_nframes

    for total, fps, ele in [
        (300, 30, {}),
        (301, 29.97, {"fps": 0.5}),
        (17, 24, {"nframes": 5}),
        (1000, 25, {"max_frames": 33}),
        (9, 30, {}),
    ]:
        n = smart_nframes(ele, total, fps)
        assert sample_indices(ele, total, fps) == torch.linspace(0, total - 1, n).round().long().tolist()


def test_frame_list_with_odd_count_is_resized_once(repo, proc, tmp_path):
    # qwen-vl-utils 0.0.14 resizes list frames twice (`fetch_video` passes 28 as
    # `image_patch_size` to `fetch_image` for each frame); we do the intended single resize:
    # pad to an even count with the last frame, then the video rule, as for a decoded file
    import torchvision.transforms.functional as TF
    from qwen_vl_utils.vision_process import VIDEO_MAX_TOKEN_NUM, VIDEO_MIN_TOKEN_NUM
    from qwen_vl_utils.vision_process import smart_resize as qvu_resize
    from torchvision.transforms import InterpolationMode

    frames = [noise_image(150, 110, seed=i) for i in range(5)]
    paths = []
    for i, f in enumerate(frames):
        paths.append(str(tmp_path / f"f{i}.png"))
        f.save(paths[-1])
    ours = proc(user({"type": "video", "video": paths}, {"type": "text", "text": "?"}))
    stack = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames + [frames[-1]]])
    n = 6
    max_px = max(min(VIDEO_MAX_TOKEN_NUM * 784, 128000 * 784 * 0.9 / n * 2), int(VIDEO_MIN_TOKEN_NUM * 784 * 1.05))
    h, w = qvu_resize(110, 150, 28, VIDEO_MIN_TOKEN_NUM * 784, max_px)
    intended = TF.resize(stack, [h, w], interpolation=InterpolationMode.BICUBIC, antialias=True).float()
    from transformers import AutoProcessor

    hp = AutoProcessor.from_pretrained(repo)
    text = hp.apply_chat_template(
        user({"type": "video", "video": paths}, {"type": "text", "text": "?"}),
        tokenize=False,
        add_generation_prompt=True,
    )
    ref = hp(text=[text], videos=[intended], return_tensors="pt")
    check(ours, ref)


def test_numpy_array_video(repo, proc):
    arr = np.stack([np.asarray(noise_image(64, 48, seed=i)) for i in range(4)])
    ours = proc(user({"type": "video", "video": arr}, {"type": "text", "text": "?"}))
    assert ours["video_grid_thw"].tolist()[0][0] == 2


def test_plan_decodes_nothing_and_agrees_with_processing(proc, tmp_path):
    path = make_video(tmp_path / "p.mp4", frames=50, fps=25)
    conv = user({"type": "video", "video": str(path)}, {"type": "text", "text": "Summarise."})
    plan = proc.plan(conv)
    batch = proc(conv)
    item = plan.items[0]
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert item.tokens == t * h * w // 4 and plan.prompt_tokens == batch["input_ids"].shape[1]
    # 2 s at 25 fps, sampled at 2 fps: 4 frames, linspace(0, 49, 4) rounded
    assert item.frame_indices == [0, 16, 33, 49] and item.timestamps == [0.0, 0.64, 1.32, 1.96]
    assert item.source_size == (128, 96) and item.resized_size == (w * 14, h * 14)


def test_bad_videos(proc, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(InputError, match="video 0"):
        proc(user({"type": "video", "video": str(bad)}))
    one = make_video(tmp_path / "one.mp4", frames=1)
    with pytest.raises(InputError, match="at least 2"):
        proc(user({"type": "video", "video": str(one)}))
    ok = make_video(tmp_path / "ok.mp4")
    with pytest.raises(InputError, match="either fps or nframes"):
        proc(user({"type": "video", "video": str(ok), "fps": 1, "nframes": 4}))
    with pytest.raises(InputError, match="no such file"):
        plan_video({"video": str(tmp_path / "missing.mp4")}, MediaPolicy())
