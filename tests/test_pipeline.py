"""The Python API and the command line on the tiny checkpoint: generation parity with transformers (default
generation config included), streaming, batching, chat sessions with cache reuse, grounding, hub resolution."""

from __future__ import annotations

import pytest
import torch

import qwen2vl
from processing_fixtures import noise_image, oracle
from qwen2vl.pipeline import ChatSession

NEW = 48


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return qwen2vl.load(str(tiny_ckpt), dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    noise_image(200, 150, seed=1).save(d / "a.png")
    noise_image(90, 260, seed=2).save(d / "b.png")
    frames = [noise_image(64, 48, seed=10 + i) for i in range(6)]
    paths = []
    for i, f in enumerate(frames):
        paths.append(str(d / f"f{i}.png"))
        f.save(paths[-1])
    return d, paths


def conversations(media):
    d, frames = media
    return {
        "text only": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
        "one image": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(d / "a.png")},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],
        "two images": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(d / "a.png")},
                    {"type": "image", "image": str(d / "b.png")},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
        "video": [
            {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}
        ],
    }


def reference_tokens(ckpt, hf_model_factory, batch):
    """transformers' `generate` under the checkpoint's generation_config."""
    ref = hf_model_factory(ckpt, attn="sdpa")
    with torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW)
    return out[:, batch["input_ids"].shape[1] :]


def our_tokens(pipe, batch, **sampling):
    from qwen2vl.generate.decode import Prompt, generate_steps
    from qwen2vl.generate.sampling import chooser

    params = pipe.params(max_new_tokens=NEW, **sampling).with_(stop_token_ids=())

    steps = generate_steps(pipe.model, Prompt.from_batch(batch), chooser(params), NEW)
    return torch.stack([s.tokens for s in steps], dim=1)


@pytest.mark.parametrize("case", ["text only", "one image", "two images", "video"])
def test_checkpoint_generation_config_equals_reference_generate(case, pipe, media, tiny_ckpt, hf_model_factory):
    """The checkpoint's generation_config as transformers applies it (plain greedy decoding against the reference is
    test_generate.py's). Both sides decode the same input tensors (the processor is compared with its oracle in its
    own tests; for frame lists it deliberately differs from qwen-vl-utils' double resize)."""
    batch = oracle(tiny_ckpt, conversations(media)[case])
    assert torch.equal(our_tokens(pipe, batch), reference_tokens(tiny_ckpt, hf_model_factory, batch))


def test_mixed_batch_equals_reference_and_rows_alone(pipe, media, tiny_ckpt, hf_model_factory):
    convs = list(conversations(media).values())
    batch = oracle(tiny_ckpt, convs)
    expected = reference_tokens(tiny_ckpt, hf_model_factory, batch)
    assert torch.equal(our_tokens(pipe, batch), expected)
    texts = pipe.generate(convs, max_new_tokens=12)
    assert texts == [pipe.generate([c], max_new_tokens=12)[0] for c in convs]


def test_generate_keeps_special_tokens_when_asked(pipe, media):
    """`skip_special_tokens=False` keeps markers such as the grounding ones (a logit bias makes the model emit
    <|box_start|>, id 151648, at every step); the default drops them, as the reference's decode does."""
    conv = conversations(media)["one image"]
    kept, dropped = (
        pipe.generate([conv], max_new_tokens=3, logit_bias={151648: 100.0}, skip_special_tokens=skip)[0]
        for skip in (False, True)
    )
    assert kept == "<|box_start|>" * 3 and dropped == ""


def test_stream_chat_and_stop_strings(pipe, media):
    conv = conversations(media)["one image"]
    pieces = list(pipe.stream(conv, max_new_tokens=20))
    assert "".join(pieces) == pipe.chat(conv, max_new_tokens=20) == pipe.generate([conv], max_new_tokens=20)[0]
    full = "".join(pieces)
    middle = len(full) // 2
    at = next(i for i in range(middle, len(full) - 1) if full[i : i + 2].strip())  # a stop that is not just spaces
    stop = full[at : at + 2]
    cut = pipe.chat(conv, max_new_tokens=20, stop=[stop])
    assert cut == full[: full.find(stop)] and len(cut) < len(full)
    assert pipe.generate([conv], max_new_tokens=20, stop=[stop]) == [cut]  # the batch path cuts the same way


def test_chat_session_reuses_history_and_vision(pipe, media):
    d, _ = media
    session = ChatSession(pipe)
    first = "".join(
        session.send([{"type": "image", "image": str(d / "a.png")}, {"type": "text", "text": "Hi"}], max_new_tokens=8)
    )
    t1 = pipe.last_timings
    encoded = pipe.vision_cache.misses
    second = "".join(session.send("And then?", max_new_tokens=8))
    t2 = pipe.last_timings
    assert t1.reused_tokens == 0 and t2.reused_tokens > t1.prompt_tokens - 2  # only the new turn is run
    assert pipe.vision_cache.misses == encoded  # the image was not encoded again
    # the reused cache gives the same answer as a fresh run of the whole conversation
    fresh = pipe.chat(session.messages[:-1], max_new_tokens=8)
    assert second == fresh and first
