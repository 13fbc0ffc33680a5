"""The processor against qwen-vl-utils 0.0.14 + transformers 4.57.6 on generated media of awkward sizes."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
import torch

from processing_fixtures import noise_image, oracle
from qwen2vl.processing import IncrementalDetokenizer, InputError, MediaPolicy, Processor
from qwen2vl.processing.image import smart_resize
from qwen2vl.testing.tokenizer_files import write_preprocessor_config, write_tokenizer_files


def assert_same(ours, ref, tol=1e-5):
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        assert (pix in ours) == (pix in ref)
        if pix in ref:
            assert torch.equal(ours[grid], ref[grid])
            assert ours[pix].shape == ref[pix].shape
            assert (ours[pix] - ref[pix]).abs().max().item() <= tol


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize(
    "mode, size, fmt",
    [
        ("RGBA", (123, 77), "PNG"),
        ("L", (301, 199), "JPEG"),
        ("RGB", (10, 10), "PNG"),
        ("P", (90, 140), "PNG"),
        ("LA", (64, 50), "PNG"),
        ("CMYK", (80, 96), "JPEG"),
        ("RGB", (5544, 28), "PNG"),
        ("RGB", (1024, 683), "JPEG"),
    ],
)
def test_images_equal_reference(mode, size, fmt, repo, proc, tmp_path):
    path = tmp_path / f"x.{fmt.lower()}"
    noise_image(*size, mode=mode).save(path, fmt)
    conv = user({"type": "image", "image": str(path)}, {"type": "text", "text": "What is it?"})
    assert_same(proc(conv), oracle(repo, conv))


def test_per_item_bounds_and_exact_sizes(repo, proc, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    noise_image(640, 480, seed=1).save(a)
    noise_image(333, 999, seed=2).save(b)
    conv = user(
        {"type": "image", "image": f"file://{a}", "max_pixels": 50176},
        {"type": "image", "image": str(b), "min_pixels": 1003520},
        {"type": "image", "image": str(a), "resized_height": 100, "resized_width": 250},
        {"type": "text", "text": "Compare."},
    )
    assert_same(proc(conv), oracle(repo, conv))


def test_base64_and_local_http_sources(repo, proc, tmp_path):
    buf = io.BytesIO()
    noise_image(200, 120, seed=3).save(buf, "PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    (tmp_path / "web.png").write_bytes(buf.getvalue())
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web.png"
        conv = user(
            {"type": "image", "image": data_uri}, {"type": "image", "image": url}, {"type": "text", "text": "?"}
        )
        assert_same(proc(conv), oracle(repo, conv))
        # OpenAI-style parts give the same tensors
        openai = user(
            {"type": "image_url", "image_url": {"url": data_uri}},
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "?"},
        )
        assert_same(proc(openai), oracle(repo, conv))
        # a server's policy refuses loopback addresses
        strict = proc.with_policy(MediaPolicy(allow_private_addresses=False))
        with pytest.raises(InputError, match="non-public"):
            strict(conv)
        with pytest.raises(InputError, match="could not fetch"):
            proc(user({"type": "image", "image": url + ".missing"}))
    finally:
        server.shutdown()


def test_batch_left_padded_multi_turn_with_earlier_images(repo, proc, tmp_path):
    p = tmp_path / "p.png"
    noise_image(300, 200, seed=4).save(p)
    one = user({"type": "text", "text": "Hello there, how are you today?"})
    two = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": str(p)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A pattern."},
        {
            "role": "user",
            "content": [{"type": "image", "image": str(p), "max_pixels": 20000}, {"type": "text", "text": "And now?"}],
        },
    ]
    assert_same(proc([one, two]), oracle(repo, [one, two]))


def test_chat_template_strings(repo, proc):
    from transformers import AutoProcessor

    hp = AutoProcessor.from_pretrained(repo)
    conv = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a"},
                {"type": "image", "image": "b"},
                {"type": "video", "video": "c"},
                {"type": "text", "text": "Compare."},
            ],
        },
        {"role": "assistant", "content": "OK."},
        {"role": "user", "content": "Thanks"},
    ]
    for vid in (False, True):
        for gen in (False, True):
            assert proc.apply_chat_template(conv, gen, add_vision_id=vid) == hp.apply_chat_template(
                conv, tokenize=False, add_generation_prompt=gen, add_vision_id=vid
            )


def test_custom_template_from_a_fine_tune(tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    write_tokenizer_files(tmp_path, chat_template=template)
    write_preprocessor_config(tmp_path)
    p = Processor.from_pretrained(tmp_path)
    assert p.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"


def test_tokenizer_matches_tiktoken_on_varied_text(proc):
    import tiktoken

    from qwen2vl.testing.tokenizer_files import SPLIT_PATTERN, _vocab_file

    lines = _vocab_file().read_bytes().splitlines()
    ranks = {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines if line)}
    enc = tiktoken.Encoding(
        "qwen", pat_str=SPLIT_PATTERN.replace(r"\p{L}", r"\p{L}"), mergeable_ranks=ranks, special_tokens={}
    )
    samples = [
        "Hello, world! 12345 6789",
        "  leading spaces\n\n\ttabs and\r\nnewlines   ",
        "emoji 🤖👍🏽 and café",
        "中文测试，还有标点。",
        "한국어 텍스트 분할",
        "مرحبا بالعالم",
        "code: def f(x): return x**2  # ok",
        "ünïcödé NFC e\u0301",
        "I'm sure they'll've done it",
    ]
    import unicodedata

    for s in samples:
        assert proc.tokenizer.encode(s) == enc.encode(unicodedata.normalize("NFC", s)), s


@pytest.mark.parametrize("text", ["안녕하세요 세계", "你好，世界！", "مرحبا", "🤖👍🏽🎉 done", "plain ascii"])
def test_incremental_detokenizer_never_splits_characters(proc, text):
    ids = proc.tokenizer.encode(text)
    det = IncrementalDetokenizer(proc.tokenizer)
    pieces = [det.push(i) for i in ids] + [det.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_smart_resize_both_variants_match_references():
    from qwen_vl_utils.vision_process import smart_resize as qvu
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(10, 5000, 2))
        if max(h, w) / min(h, w) > 200:
            continue
        lo = int(rng.choice([3136, 100352, 200704]))
        hi = int(rng.choice([50176, 1003520, 12845056]))
        if hi < lo:
            continue
        assert smart_resize(h, w, 28, lo, hi) == qvu(h, w, 28, lo, hi)
        assert smart_resize(h, w, 28, lo, hi, variant="transformers") == hf(h, w, 28, lo, hi)
        checked += 1
    assert checked >= 200  # the filters above leave most draws


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b"not an image at all"), "not a recognised image format"),
        (lambda p: p.write_bytes(_png(300, 300)[:300]), "truncated"),
    ],
)
def test_bad_images_name_the_item(make, match, proc, tmp_path):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(InputError, match=match) as e:
        proc(user({"type": "image", "image": str(p)}))
    assert "image 0" in str(e.value)


def test_limits(proc, tmp_path):
    p = tmp_path / "big.png"
    noise_image(3000, 3000).save(p)
    with pytest.raises(InputError, match="exceed the limit of 4000000"):
        proc.with_policy(MediaPolicy(max_image_pixels=4_000_000))(user({"type": "image", "image": str(p)}))
    thin = tmp_path / "thin.png"
    noise_image(4100, 20).save(thin)
    with pytest.raises(InputError, match="aspect ratio 205.0"):
        proc(user({"type": "image", "image": str(thin)}))
    with pytest.raises(InputError, match="outside the allowed media directory"):
        proc.with_policy(MediaPolicy(local_root=tmp_path / "sub"))(user({"type": "image", "image": str(p)}))
    long = user({"type": "text", "text": "word " * 300})
    with pytest.raises(InputError, match=r"has 3\d\d tokens, more than the model's context of 100"):
        Processor(proc.tokenizer, proc.chat_template, max_context=100)(long)
    with pytest.raises(InputError, match="unsupported content part type 'audio'"):
        proc(user({"type": "audio", "audio": "x"}))


def _png(w, h):
    buf = io.BytesIO()
    noise_image(w, h).save(buf, "PNG")
    return buf.getvalue()
