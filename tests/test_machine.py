"""The per-machine choice of CPU paths (qwen2vl.machine): forced, decided from flags, timed once and cached, and
the bf16 path's drift against the reference, which must not exceed the reference's own bf16 drift."""

from __future__ import annotations

import json

import pytest
import torch

import qwen2vl
from model_inputs import CASES, build
from qwen2vl import kernels, machine
from qwen2vl.cpu import WeightOnlyLinear
from qwen2vl.testing.checkpoint import make_config, write_checkpoint

BIG = (4096, 1536)  # above the size below which auto keeps float32 without timing


@pytest.fixture
def fake_cpu(monkeypatch, tmp_path):
    """A CPU with the given flags, an empty cache, and a timing that records its calls."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []

    def install(flags, times):
        facts = machine.CpuFacts("Test CPU", "x86_64", frozenset(flags))
        monkeypatch.setattr(machine, "cpu_facts", lambda: facts)

        def timed(shape, rows=256, repeats=3):
            calls.append(shape)
            return dict(times)

        monkeypatch.setattr(machine, "time_matmul_paths", timed)
        monkeypatch.setattr(machine, "_decide_gemv", lambda shape, inputs: "C kernels (not timed in this test)")
        return calls

    return install


def test_without_bf16_instructions_float32_is_chosen_untimed(fake_cpu):
    calls = fake_cpu({"avx2", "fma"}, {"float32": 1.0, "bf16": 0.1})
    choice = machine.choose([BIG])
    assert choice.matmul == "float32" and "no bf16 matrix instructions" in choice.matmul_reason and not calls


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16", "bf16"])  # x86 AVX-512 BF16, Intel AMX, ARM BF16
def test_with_bf16_instructions_the_faster_path_wins_and_is_cached(fake_cpu, tmp_path, flag):
    calls = fake_cpu({flag}, {"float32": 1.0, "bf16": 0.4})
    first = machine.choose([(10, 10), BIG])
    assert first.matmul == "bf16" and "GFLOP/s" in first.matmul_reason and calls == [BIG]  # the largest shape
    again = machine.choose([BIG])
    assert again.matmul == "bf16" and "timed earlier" in again.matmul_reason and len(calls) == 1
    assert len(json.loads((tmp_path / "qwen2vl" / "cpu-choice.json").read_text())) == 1


def test_bf16_must_win_clearly(fake_cpu):
    fake_cpu({"avx512_bf16"}, {"float32": 1.0, "bf16": 0.95})  # within the margin: keep the exact path
    assert machine.choose([BIG]).matmul == "float32"


def test_small_models_and_forced_paths(fake_cpu):
    calls = fake_cpu({"avx512_bf16"}, {"float32": 1.0, "bf16": 0.1})
    assert machine.choose([(64, 48)]).matmul == "float32" and not calls  # tiny: exact, untimed
    assert machine.choose([BIG], "float32").matmul == "float32" and not calls
    assert machine.choose([(64, 48)], "bf16").matmul_reason == "asked for"
    with pytest.raises(ValueError, match="cpu matmul must be"):
        machine.choose([BIG], "fp8")


def test_decode_kernel_variant_is_timed_once_and_cached(monkeypatch, tmp_path):
    from qwen2vl import kernels

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("QWEN2VL_KERNELS", raising=False)
    # a CPU with both variants, whatever this one has (variant() reads the cached flags through _supported)
    for name, value in (
        ("supported", lambda: ["avx512", "avx2"]),
        ("_supported", lambda: ("avx512", "avx2")),
        ("builds", lambda name: True),
        ("available", lambda: True),
    ):
        monkeypatch.setattr(kernels, name, value)
    calls = []

    def timed(shape, variants, repeats=5, inputs="float32"):
        calls.append((shape, tuple(variants)))
        # the wider variant is not always the faster one; with bf16 inputs (AVX-512 BF16 pairs) it may be
        return {"avx512": 2.0, "avx2": 1.0} if inputs == "float32" else {"avx512": 0.5, "avx2": 1.0}

    monkeypatch.setattr(machine, "time_kernel_variants", timed)
    try:
        first = machine.choose([(10, 10), BIG], "float32")
        assert "avx2" in first.gemv and "GB/s" in first.gemv and calls == [(BIG, ("avx512", "avx2"))]
        assert kernels.variant() == "avx2"
        again = machine.choose([BIG], "float32")
        assert "timed earlier" in again.gemv and len(calls) == 1
        # a model computing in bf16 gives its decode products bf16 inputs: timed (and cached) for those
        under_bf16 = machine.choose([BIG], "bf16")
        assert "avx512" in under_bf16.gemv and "bf16 inputs" in under_bf16.gemv and len(calls) == 2
        assert kernels.variant() == "avx512"
        assert "timed earlier" in machine.choose([BIG], "bf16").gemv and len(calls) == 2
        kernels.use("avx512")  # forced: no timing, and it is what runs
        assert "forced" in machine.choose([BIG], "float32").gemv and kernels.variant() == "avx512" and len(calls) == 2
    finally:
        kernels.use(None)
        kernels.prefer(None)


def test_this_machine_is_described():
    facts = machine.cpu_facts()
    assert facts.model and facts.arch
    text = machine.choose([BIG]).describe()
    assert facts.model in text and torch.__version__ in text


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_bf16_matmul_path_is_the_native_bf16_product(storage):
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 96, generator=g), torch.randn(40, generator=g)
    lin = WeightOnlyLinear.quantize(w, b, storage)
    x = torch.randn(3, 70, 96, generator=g)  # 210 rows: the many-row path
    exact = lin(x)
    lin.matmul = "bf16"
    got = lin(x)
    wb = lin.dequantized().to(torch.bfloat16)
    assert torch.equal(got, torch.nn.functional.linear(x.to(torch.bfloat16), wb).float() + b)
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()  # bf16 inputs: ~3 significant digits
    # few rows go through the decode kernels: under bf16 products on bf16-rounded inputs (bf16 weights; int8 keeps
    # its int16 rounding), with float32 sums
    few = torch.randn(2, 96, generator=g)
    lin.matmul = "float32"
    want = lin(few)
    lin.matmul = "bf16"
    got = lin(few)
    if not kernels.available():  # no kernels: torch's native bf16 product, as for many rows
        assert torch.equal(got, torch.nn.functional.linear(few.to(torch.bfloat16), wb).float() + b)
    elif storage == "int8":
        assert torch.equal(got, want)
    else:
        rounded = torch.nn.functional.linear(few.to(torch.bfloat16).double(), wb.double()) + b.double()
        assert (got.double() - rounded).abs().max() <= 1e-5 * rounded.abs().max()
        assert not torch.equal(got, want)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return write_checkpoint(
        tmp_path_factory.mktemp("bf16"), make_config(), seed=4, dtype=torch.bfloat16, tokenizer=False
    )


def test_bf16_compute_drifts_no_more_than_the_reference_in_bf16(bf16_ckpt, hf_model_factory, parity_report):
    # the same inputs and measure for both: max |logit - reference float32 logit| over real positions, over several
    # inputs (the worst ratio counts)
    ref32 = hf_model_factory(bf16_ckpt, dtype=torch.float32, attn="sdpa")
    ref16 = hf_model_factory(bf16_ckpt, dtype=torch.bfloat16, attn="sdpa")
    ours = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, cpu_matmul="bf16")
    assert ours.cpu_choice.matmul == "bf16"
    # the vision attention is the bf16 kernel wherever it runs: the drift below covers it there
    assert ours.cpu_choice.vision_attention == ("avx512_bf16" if kernels.bf16_attention_runs() else "torch")
    assert ours.cpu_choice.vision_attention in ours.cpu_choice.describe()
    ratios = []
    for case, seed in (
        ("left-padded batch: text / image / video", 21),
        ("two images, different aspect ratios", 3),
        ("image then video then image", 8),
    ):
        batch = build(CASES[case], seed=seed)
        keep = batch["attention_mask"].bool()
        with torch.no_grad():
            want = ref32(**batch).logits
            theirs = (
                (
                    ref16(
                        **{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
                    ).logits.float()
                    - want
                )[keep]
                .abs()
                .max()
                .item()
            )
            mine = (ours(**batch) - want)[keep].abs().max().item()
        print(
            f"{case}: max |logit - reference float32|: ours with bf16 products {mine:.3g}, reference in bf16 "
            f"{theirs:.3g}"
        )
        ratios.append(mine / theirs)
    parity_report("bf16 products: our drift / the reference's own bf16 drift (worst of 3 inputs)", max(ratios), 1.0)
    exact = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, cpu_matmul="float32")
    with torch.no_grad():
        assert (exact(**batch) - want)[keep].abs().max().item() < 1e-4  # float32 stays exact
