"""The demo model: a small Qwen2-VL trained with our own `finetune` code to see coloured shapes, count them and
locate them, so that the first command of the README answers right offline.

The task (anyone can draw test pictures of their own from this description):
- a plain white square RGB canvas, 224x224 to 448x448 pixels;
- 1 to 3 non-overlapping filled shapes, each a circle, an axis-aligned square or an upright triangle (equilateral-ish,
  base at the bottom), of side or diameter 40 to 120 pixels, in red (220,40,40), green (40,160,60), blue
  (40,70,220) or yellow (230,200,40); no two shapes share both colour and kind;
- "What shapes are in this picture?" -> "a red circle and a blue square" (colours in the order red, green, blue,
  yellow; kinds circle, square, triangle);
  "How many shapes are there?" -> "2";
  "Where is the red circle?" -> `<|object_ref_start|>the red circle<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)
  <|box_end|>`, the shape's bounding box on Qwen2-VL's 0-1000 scale of the image's width and height.

The model is an official Qwen2-VL checkpoint in every respect (config.json, safetensors under the hub's names, the
real Qwen2 vocabulary and chat template), only small: transformers loads it unchanged. `train_demo` trains it from a
seed with `Trainer`; `benchmarks/demo_accuracy.py` scores it on pictures drawn by an independent program.

Status: the recipe does not yet reach the task's bar (see docs/training.md, "The demo model"), so no weights ship and
the README's first command still uses the random tiny checkpoint.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
KINDS = ("circle", "square", "triangle")
SIDE = (40, 120)  # side or diameter, pixels
CANVAS = (224, 448)  # side of the square canvas, pixels

DESCRIBE = "What shapes are in this picture?"
COUNT = "How many shapes are there?"
WHERE = "Where is the {colour} {kind}?"

# Small, so that training fits a CPU; the vocabulary is the real one (151,936 rows, tied to the output layer).
TEXT = {
    "vocab_size": 151936,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "tie_word_embeddings": True,
    # Where a shape is reaches the decoder only through M-RoPE's angles between tokens; the width gets a head's
    # lowest frequencies. With the official theta (1e6) they would turn by under 0.002 rad across a picture: the model
    # could not tell left from right. With 32 dimensions a head and theta 10, the width's pairs turn by 0.9 to 1.9 rad
    # across an 8-token row and the height's by 2.2 to 4.5.
    "rope_theta": 10.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
}
VISION = {"depth": 4, "embed_dim": 96, "num_heads": 4, "mlp_ratio": 2, "hidden_size": 128}
# The image processor's bounds: every square canvas of the task becomes 224x224 pixels, 8x8 image tokens (smart_resize
# scales a square's side to 216 or 236, then rounds to the multiple of 28 between them). One grid for every picture
# lets the small model read positions straight from the rotary phases; other pictures still work, sized as usual.
MIN_PIXELS, MAX_PIXELS = 216 * 216, 236 * 236


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in pixels, inclusive of the first, exclusive of the last

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


def draw_scene(rng: random.Random) -> tuple[Image.Image, list[Shape]]:
    """A canvas with 1-3 shapes drawn as the module docstring says; shapes in the order `describe` names them."""
    width = height = rng.randint(*CANVAS)
    count = rng.randint(1, 3)
    pairs = rng.sample([(c, k) for c in COLOURS for k in KINDS], count)
    shapes: list[Shape] = []
    for colour, kind in pairs:
        for _ in range(200):  # rejection sampling of a free spot
            side = rng.randint(*SIDE)
            # a triangle is equilateral (height 0.87 of its side) to isosceles (height = side)
            tall = side if kind != "triangle" else round(side * rng.uniform(0.85, 1.0))
            x, y = rng.randint(0, width - side), rng.randint(0, height - tall)
            box = (x, y, x + side, y + tall)
            if all(_apart(box, s.box, 4) for s in shapes):
                shapes.append(Shape(kind, colour, box))
                break
    return render(shapes, (width, height)), sorted(shapes, key=_canonical)


def render(shapes: list[Shape], size: tuple[int, int]) -> Image.Image:
    """The picture of `shapes` on a white canvas of `size` (width, height)."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x1, y1, x2, y2 = s.box
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        else:
            draw.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    return image


def _canonical(shape: Shape) -> tuple[int, int]:
    """Colours, then kinds, in the order they are listed: the answer does not depend on where the shapes are."""
    return list(COLOURS).index(shape.colour), KINDS.index(shape.kind)


def _apart(a, b, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def describe(shapes: list[Shape]) -> str:
    names = [f"a {s.name}" for s in sorted(shapes, key=_canonical)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def locate(shape: Shape, size: tuple[int, int]) -> str:
    """The grounding answer, corners on the 0-1000 scale (Qwen2-VL's convention, x/W*1000)."""
    width, height = size
    x1, y1, x2, y2 = shape.box
    p = [int(x1 / width * 1000), int(y1 / height * 1000), int(x2 / width * 1000), int(y2 / height * 1000)]
    return (
        f"<|object_ref_start|>the {shape.name}<|object_ref_end|><|box_start|>({p[0]},{p[1]}),({p[2]},{p[3]})<|box_end|>"
    )


def questions(shapes: list[Shape], size: tuple[int, int]) -> list[tuple[str, str]]:
    """Every question about one picture, with its answer."""
    qa = [(DESCRIBE, describe(shapes)), (COUNT, str(len(shapes)))]
    return qa + [(WHERE.format(colour=s.colour, kind=s.kind), locate(s, size)) for s in shapes]


def conversation(image, question: str, answer: str) -> list[dict]:
    """One question about one picture, the picture first: as the README, the CLI and the benchmark ask."""
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


# how often each kind of question is asked in training: locating is the hardest skill, so it gets the most steps
MIX = {DESCRIBE: 0.3, COUNT: 0.15, "where": 0.55}
# the first stage only names and counts: the model learns to look before it learns where (digits of boxes, whose
# loss dominates a mixed batch, are noise until it does)
LOOK = {DESCRIBE: 0.65, COUNT: 0.35, "where": 0.0}


def make_dataset(directory: str | Path, count: int, seed: int, mix: dict[str, float] = MIX) -> list[list[dict]]:
    """`count` pictures written as PNG under `directory`, and one question (drawn by `mix`) about each."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    data = []
    for i in range(count):
        image, shapes = draw_scene(rng)
        path = directory / f"{i:06d}.png"
        image.save(path)
        qa = questions(shapes, image.size)
        kind = rng.choices(list(mix), weights=list(mix.values()))[0]
        question, answer = qa[0] if kind == DESCRIBE else qa[1] if kind == COUNT else rng.choice(qa[2:])
        data.append(conversation(str(path), question, answer))
    return data


# -- the checkpoint ------------------------------------------------------------------------------------------------
# The trained weights ship with the package, compact: every tensor but the token embedding, whose only non-zero rows
# (the task's tokens, `task_vocab`) are stored under EMBED_IDS. `write_demo` expands them into the official layout.
WEIGHTS = Path(__file__).with_name("demo_model.safetensors")
EMBED = "model.embed_tokens.weight"
EMBED_IDS = "demo.embed_token_ids"


def _write_files(directory: Path, dtype: torch.dtype) -> None:
    """Every file of the checkpoint except the weights."""
    from ..testing.checkpoint import GENERATION_CONFIG, make_config
    from ..testing.tokenizer_files import write_preprocessor_config, write_tokenizer_files

    config = make_config(TEXT, VISION, torch_dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype])
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer_files(directory)
    write_preprocessor_config(directory)
    path = directory / "preprocessor_config.json"
    pre = json.loads(path.read_text())
    pre.update(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pre.pop("size", None)
    path.write_text(json.dumps(pre, indent=2))


def task_vocab(processor) -> tuple[int, ...]:
    """Every token id a conversation of the task holds: the chat template's (system prompt, role markers, the image
    placeholder), the questions', and those of every answer (all descriptions, the counts, the grounding format with
    every digit). Only these rows of the tied embedding are non-zero."""
    from .data import encode

    pairs = [f"{c} {k}" for c in COLOURS for k in KINDS]
    answers = ["1", "2", "3", describe([Shape(k, c, (0, 0, 1, 1)) for c in COLOURS for k in KINDS])]
    answers += [describe([Shape(k, c, (0, 0, 1, 1))]) for c in COLOURS for k in KINDS]
    digits = [str(d) * n for d in range(10) for n in (1, 2, 3)]
    answers += [
        f"<|object_ref_start|>the {pair}<|object_ref_end|><|box_start|>({a},{b}),({a},{b})<|box_end|>"
        for pair in pairs
        for a, b in zip(digits, digits[1:] + digits[:1])
    ]
    questions = [DESCRIBE, COUNT] + [WHERE.format(colour=c, kind=k) for c in COLOURS for k in KINDS]
    image = Image.new("RGB", (56, 56), (255, 255, 255))
    ids: set[int] = set()
    for question in questions:
        example = encode(processor, conversation(image, question, "1"), "the task's vocabulary")
        ids.update(example.input_ids.tolist())
    for answer in answers:
        ids.update(processor.tokenizer.encode(answer))
    ids.add(processor.tokenizer.token_id("<|im_end|>"))
    return tuple(sorted(ids))


def initial_weights(seed: int, vocab: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The starting point, float32, under the hub's names: matrices normal with standard deviation 1/sqrt(fan-in)
    (transformers' 0.02 leaves a model this narrow with near-uniform attention for hundreds of steps: counting alone
    stayed at chance for 300 steps, and learnt with this), embeddings normal(0, 0.02) on the rows of `vocab` and zero
    on every other row, biases zero, norms one."""
    from ..testing.checkpoint import make_config, tensor_shapes

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in tensor_shapes(make_config(TEXT, VISION)).items():
        if len(shape) == 1:
            is_norm = "norm" in name or "ln_q" in name
            tensors[name] = torch.ones(shape) if is_norm and name.endswith("weight") else torch.zeros(shape)
        elif name == EMBED:
            rows = torch.zeros(shape)
            ids = torch.tensor(vocab)
            rows[ids] = torch.randn(len(ids), shape[1], generator=gen) * 0.02
            tensors[name] = rows
        else:
            fan_in = math.prod(shape[1:])
            tensors[name] = torch.randn(shape, generator=gen) * fan_in**-0.5
    return tensors


def pack(checkpoint: str | Path, path: str | Path = WEIGHTS) -> Path:
    """Store a trained demo checkpoint's weights compactly (bf16; the embedding's non-zero rows only)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(Path(checkpoint) / "model.safetensors")
    embed = tensors.pop(EMBED)
    ids = embed.any(dim=1).nonzero().flatten()
    tensors[EMBED] = embed[ids]
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    tensors[EMBED_IDS] = ids
    save_file(tensors, path, metadata={"format": "pt"})
    return Path(path)


def write_demo(directory: str | Path, weights: str | Path = WEIGHTS) -> Path:
    """Write the demo model to `directory` as an official Qwen2-VL checkpoint (bf16, real Qwen2 vocabulary), from
    the compact weights `pack` stored (those shipped with the package by default)."""
    from safetensors.torch import load_file, save_file

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: no trained demo weights (none ship with this version: the model does not reach the task's "
            "bar yet, see docs/training.md); `qwen2vl make-demo --train DIR` trains one (about 40 minutes on 2 cores "
            "of an AVX-512 BF16 CPU)"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = load_file(weights)
    ids = tensors.pop(EMBED_IDS)
    rows = tensors.pop(EMBED)
    embed = torch.zeros(TEXT["vocab_size"], rows.shape[1], dtype=rows.dtype)
    embed[ids] = rows
    tensors[EMBED] = embed
    _write_files(directory, torch.bfloat16)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


@dataclass(frozen=True)
class DemoRecipe:
    """Two runs of `Trainer`, all weights, vision included, with the reference's loss over the whole vocabulary,
    computed from the task's logits only (`TrainConfig.output_vocab`: every other row is zero, so their logits are
    exactly 0 and add log(V - n) to the softmax's denominator; about 40 logits a position instead of 151,936).
    Stage one asks only to name and count (LOOK), stage two every question (MIX); each picture is seen once."""

    look_pictures: int = 16000
    pictures: int = 40000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def train_demo(directory: str | Path, recipe: DemoRecipe = DemoRecipe(), progress: bool = True, work=None) -> Path:
    """Train the demo model from `initial_weights(seed)` with `Trainer` on fresh pictures (see DemoRecipe) and write
    it to `directory` as an official checkpoint in bfloat16, with the loss of every step in training.json."""
    import tempfile

    from safetensors.torch import save_file

    from ..processing import Processor
    from .export import save_checkpoint
    from .trainer import TrainConfig, Trainer

    directory = Path(directory)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        start = Path(tmp) / "init"
        start.mkdir()
        _write_files(start, torch.float32)
        vocab = task_vocab(Processor.from_pretrained(start))
        save_file(initial_weights(recipe.seed, vocab), start / "model.safetensors", metadata={"format": "pt"})
        config = TrainConfig(
            lora=None,
            train_vision=True,
            batch_size=recipe.batch_size,
            lr=recipe.lr,
            warmup_steps=recipe.warmup_steps,
            weight_decay=recipe.weight_decay,
            output_vocab=vocab,
            seed=recipe.seed,
        )
        history = {}
        source = start
        stages = (("look", recipe.look_pictures, LOOK), ("all", recipe.pictures, MIX))
        for index, (stage, count, mix) in enumerate(stages):
            data = make_dataset(Path(tmp) / stage, count, recipe.seed + index, mix)  # other pictures each stage
            trainer = Trainer(source, data, Path(tmp) / f"{stage}-out", config, progress=progress)
            history[stage] = trainer.train().history
            source = Path(tmp) / f"{stage}-out"
        save_checkpoint(trainer.model, start, directory, dtype=torch.bfloat16)
        (directory / "training.json").write_text(json.dumps({"recipe": asdict(recipe), "history": history}))
    return directory


# -- scoring -------------------------------------------------------------------------------------------------------
def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
