"""The demo model's recipe (`qwen2vl/train/demo.py`): the task's drawer keeps the promises its docstring makes, the
answers follow the task and the grounding format, and `train_demo` writes an official checkpoint that transformers
loads unchanged and computes as we do."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from qwen2vl.train import demo

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`train_demo` end to end on a few pictures (the real recipe draws 56,000)."""
    tmp = tmp_path_factory.mktemp("demo")
    recipe = demo.DemoRecipe(look_pictures=8, pictures=16, batch_size=4, warmup_steps=2)
    return demo.train_demo(tmp / "trained", recipe, progress=False, work=tmp)


def test_the_drawer_keeps_the_task_description():
    rng = random.Random(5)
    counts = set()
    for _ in range(300):
        image, shapes = demo.draw_scene(rng)
        width, height = image.size
        assert width == height and demo.CANVAS[0] <= width <= demo.CANVAS[1]
        assert 1 <= len(shapes) <= 3 and len({s.name for s in shapes}) == len(shapes)
        counts.add(len(shapes))
        assert demo.describe(shapes) == " and ".join(", ".join(f"a {s.name}" for s in shapes).rsplit(", ", 1))
        for i, s in enumerate(shapes):
            x1, y1, x2, y2 = s.box
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert demo.SIDE[0] <= x2 - x1 <= demo.SIDE[1]
            assert (x2 - x1) * 0.85 - 1 <= y2 - y1 <= x2 - x1
            assert image.getpixel(((x1 + x2) // 2, (y1 + y2 * 3) // 4)) == demo.COLOURS[s.colour]
            for other in shapes[i + 1 :]:
                assert demo.iou(s.box, other.box) == 0.0
            assert image.getpixel((x1, y1)) == ((255,) * 3 if s.kind != "square" else demo.COLOURS[s.colour])
    assert counts == {1, 2, 3}


def test_answers_follow_the_task_and_the_grounding_format():
    from qwen2vl.grounding import parse_boxes

    shapes = [demo.Shape("square", "blue", (10, 20, 110, 120)), demo.Shape("circle", "red", (200, 30, 260, 90))]
    assert demo.describe(shapes) == "a red circle and a blue square"  # colours in the listed order, not by place
    assert demo.describe(shapes[:1]) == "a blue square"
    answer = demo.locate(shapes[1], (300, 300))
    assert answer == ("<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(666,100),(866,300)<|box_end|>")
    (box,) = parse_boxes(answer, (300, 300))
    assert box.label == "the red circle" and demo.iou([*box.pixels[0], *box.pixels[1]], shapes[1].box) > 0.95


def test_the_training_set_asks_one_question_a_picture_image_first(tmp_path):
    data = demo.make_dataset(tmp_path, 200, seed=3)
    asked = set()
    for conversation in data:
        user, assistant = conversation
        image, question = user["content"]
        assert image["type"] == "image" and Path(image["image"]).is_file() and question["type"] == "text"
        answer = assistant["content"][0]["text"]
        kind = question["text"] if question["text"] in (demo.DESCRIBE, demo.COUNT) else "where"
        asked.add(kind)
        if kind == demo.COUNT:
            assert answer in ("1", "2", "3")
        elif kind == "where":
            assert question["text"].removeprefix("Where is the ").removesuffix("?") in answer
    assert asked == set(demo.MIX)


def test_train_demo_writes_an_official_checkpoint_transformers_computes_as_we_do(trained):
    from transformers import Qwen2VLForConditionalGeneration

    from processing_fixtures import oracle
    from qwen2vl.processing import Processor
    from qwen2vl.weights import load_model

    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and config["vocab_size"] == 151936
    assert config["torch_dtype"] == "bfloat16" and config["rope_theta"] == demo.TEXT["rope_theta"]
    pre = json.loads((trained / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (demo.MIN_PIXELS, demo.MAX_PIXELS)
    history = json.loads((trained / "training.json").read_text())["history"]
    assert len(history["look"]) == 2 and len(history["all"]) == 4
    assert history["all"][-1]["loss"] < history["look"][0]["loss"]
    from safetensors.torch import load_file

    from qwen2vl.processing import Processor as P

    embed = load_file(trained / "model.safetensors")[demo.EMBED]
    vocab = torch.tensor(demo.task_vocab(P.from_pretrained(trained)))
    outside = torch.ones(embed.shape[0], dtype=torch.bool)
    outside[vocab] = False
    assert not bool(embed[outside].any()) and bool(embed[vocab].any(dim=1).all())

    image, shapes = demo.draw_scene(random.Random(11))
    path = trained.parent / "question.png"
    image.save(path)
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": demo.COUNT}]}
    ]
    hf = Qwen2VLForConditionalGeneration.from_pretrained(
        trained, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    inputs = oracle(trained, conversation)
    with torch.no_grad():
        theirs = hf(**inputs).logits[0, -1]
    model = load_model(trained, dtype=torch.float32, cpu_kernels=False).eval()
    batch = Processor.from_pretrained(trained)([conversation])
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        ours = model(**batch)[0, -1]
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_the_task_vocabulary_holds_every_token_of_the_task(tmp_path):
    """`task_vocab` is computed from the task's description, not from a sample: every conversation drawn holds only
    its tokens (the Trainer refuses any other, and the zero rows could not answer them)."""
    from qwen2vl.processing import Processor
    from qwen2vl.train.data import encode

    demo._write_files(tmp_path, torch.float32)
    processor = Processor.from_pretrained(tmp_path)
    vocab = set(demo.task_vocab(processor))
    rng = random.Random(2)
    for i in range(150):
        image, shapes = demo.draw_scene(rng)
        for question, answer in demo.questions(shapes, image.size):
            ids = encode(processor, demo.conversation(image, question, answer), f"conversation {i}").input_ids
            assert set(ids.tolist()) <= vocab, (question, answer)
    assert len(vocab) < 100


def test_pack_and_write_demo_round_trip(trained, tmp_path):
    """The shipped form (embedding rows of the task only) expands into the same checkpoint."""
    from safetensors.torch import load_file

    packed = demo.pack(trained, tmp_path / "packed.safetensors")
    assert packed.stat().st_size < (trained / "model.safetensors").stat().st_size / 8
    out = demo.write_demo(tmp_path / "demo", packed)
    ours, theirs = load_file(out / "model.safetensors"), load_file(trained / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((out / "config.json").read_text()) == json.loads((trained / "config.json").read_text())
