"""Wherever the CPU kernels cannot be built or loaded, the package says so in one log line and runs on PyTorch,
with the same results: no sources (a wheel without package data), no compiler, a library that does not load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import qwen2vl
from qwen2vl import kernels
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.model.layers import RMSNorm
from qwen2vl.testing.checkpoint import make_config, write_checkpoint


def _no_sources(monkeypatch, tmp_path):
    # a wheel without its package data: reading any kernel source fails
    kernel_dir = Path(kernels.__file__).parent
    read_bytes = Path.read_bytes

    def missing(path: Path) -> bytes:
        if path.suffix == ".c" and path.parent == kernel_dir:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", missing)


def _no_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


def _fake_compiler(monkeypatch, tmp_path, script: str) -> None:
    cc = tmp_path / "fake-cc"
    cc.write_text("#!/bin/sh\n" + script)
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))


def _build_fails(monkeypatch, tmp_path):
    _fake_compiler(monkeypatch, tmp_path, 'echo "error: something the compiler did not like" >&2\nexit 1\n')


def _library_does_not_load(monkeypatch, tmp_path):
    # the "compiler" writes a file that is not a shared object (a truncated copy, another architecture's build)
    _fake_compiler(
        monkeypatch,
        tmp_path,
        'while [ "$#" -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\necho "not an ELF file" > "$out"\n',
    )


CAUSES = {
    "no sources": _no_sources,
    "no compiler": _no_compiler,
    "build fails": _build_fails,
    "library does not load": _library_does_not_load,
}


def _forget_built_kernels() -> None:
    for value in vars(kernels).values():  # every cached build/load decision
        if hasattr(value, "cache_clear"):
            value.cache_clear()


@pytest.fixture
def kernels_broken(request, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no library cached from earlier runs
    CAUSES[request.param](monkeypatch, tmp_path)
    _forget_built_kernels()
    yield
    monkeypatch.undo()
    _forget_built_kernels()  # later tests see the real kernels again


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return write_checkpoint(
        tmp_path_factory.mktemp("bf16"), make_config(), seed=6, dtype=torch.bfloat16, tokenizer=False
    )


@pytest.mark.parametrize("kernels_broken", list(CAUSES), indirect=True)
def test_a_failed_build_falls_back_with_one_log_line(kernels_broken, caplog):
    with caplog.at_level(logging.INFO, logger="qwen2vl.kernels"):
        assert not kernels.available()
        assert not kernels.available()  # decided once
    assert len(caplog.records) == 1 and "PyTorch path" in caplog.records[0].getMessage()
    x, w = torch.randn(2, 5, 24), torch.randn(24)
    assert kernels.rms_norm(x, w, 1e-6) is None  # the small ops hand back to the caller's torch path
    cos = sin = torch.randn(1, 1, 5, 8)
    assert kernels.rope_(torch.randn(1, 5, 3, 8).transpose(1, 2), cos, sin) is None
    with pytest.raises(RuntimeError, match="not available"):
        kernels.gemm_bf16(torch.randn(1, 24), torch.randn(4, 24).to(torch.bfloat16))


def _run(model, ids, mask):
    with torch.no_grad():
        logits = model(ids, mask)
    tokens = torch.stack([s.tokens for s in generate_steps(model, Prompt(ids, mask), greedy, 12)], 1)
    return logits, tokens


@pytest.fixture(scope="module")
def with_kernels(bf16_ckpt):
    """Logits and 12 greedy tokens of the bf16 model through the real kernels (module scope: computed before a
    test breaks them)."""
    assert kernels.available()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 2000, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # one left-padded row
    return ids, mask, *_run(qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False), ids, mask)


@pytest.mark.parametrize("kernels_broken", list(CAUSES), indirect=True)
def test_a_bf16_model_without_kernels_gives_the_kernel_paths_results(
    with_kernels, kernels_broken, bf16_ckpt, parity_report
):
    # the same bf16 weights and float32 arithmetic through torch ops instead of the kernels: the same logits up
    # to summation order and the same greedy tokens as the kernel path and as plain float32 PyTorch
    ids, mask, kernel_logits, kernel_tokens = with_kernels
    without = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    assert without.lm_head.weight.dtype == torch.bfloat16 and type(without.model.norm) is RMSNorm
    plain = qwen2vl.load_model(bf16_ckpt, dtype=torch.float32, progress=False, cpu_kernels=False)
    logits, tokens = _run(without, ids, mask)
    plain_logits, plain_tokens = _run(plain, ids, mask)
    keep = mask.bool()
    parity_report(
        "logits, bf16 model without kernels vs with kernels", (logits - kernel_logits)[keep].abs().max().item(), 1e-4
    )
    parity_report(
        "logits, bf16 model without kernels vs float32 PyTorch", (logits - plain_logits)[keep].abs().max().item(), 1e-4
    )
    assert torch.equal(tokens, kernel_tokens) and torch.equal(tokens, plain_tokens)
