"""CPU fast path: the weight-streaming kernels against plain PyTorch, and bf16/int8 models against the reference."""

from __future__ import annotations

import pytest
import torch

import qwen2vl
from model_inputs import CASES, build
from qwen2vl import kernels
from qwen2vl.cpu import WeightOnlyLinear, quantize_int8
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.testing.checkpoint import make_config, write_checkpoint


def test_kernels_build_here():
    # CI's machine has a C compiler and AVX2: the fast path must really be exercised there
    assert kernels.available()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 64])
@pytest.mark.parametrize("k", [8, 24, 72, 96, 200, 264, 1536])  # every tail: k % 32 in {8, 16, 24, 0}, k % 128
def test_kernels_match_torch(m, k):
    g = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(37, k, generator=g)
    x, bias = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 4, torch.randn(37, generator=g)
    wb = w.to(torch.bfloat16)
    ref = x.double() @ wb.double().T + bias.double()
    got = kernels.gemm_bf16(x, wb, bias)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # int8: the kernel multiplies the int16 rounding of x (stated in PyTorch by quantize_rows_int16) exactly
    q, scale = quantize_int8(w)
    wq = q.double() * scale.double()[:, None]
    xq, xs = kernels.quantize_rows_int16(x)
    ref = (xq.double() * xs.double()) @ wq.T + bias.double()
    got = kernels.gemm_int8(x, q, scale, bias)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # ... and that rounding moves each output by at most sum_k |w| * scale / 2
    bound = (wq.abs() @ (xs.double() / 2).T).T
    assert ((ref - (x.double() @ wq.T + bias.double())).abs() <= bound + 1e-9).all()


def test_int16_rounding_of_kernel_inputs():
    x = torch.tensor([[0.0] * 8 + [1.0, -2.0, 0.5, 3.0] * 2 + [0.0] * 112 + [1e-3] * 8])
    q, s = kernels.quantize_rows_int16(x)
    assert q[0, 8:16].tolist() == [10922, -21845, 5461, 32767] * 2  # round(v / (3 / 32767)), half to even
    assert (s[0, :128] == torch.tensor(3.0) / 32767).all() and (s[0, 128:] == torch.tensor(1e-3) / 32767).all()
    assert (q[0, :8] == 0).all() and (q[0, 128:] == 32767).all() and q.shape == (1, 136)
    zeros = torch.zeros(2, 16)
    assert (kernels.quantize_rows_int16(zeros)[1] == 1).all()  # an all-zero group keeps scale 1, not 0/0


def test_a_rows_result_does_not_depend_on_its_batch():
    # batched decoding must give each row exactly what decoding it alone gives
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 200, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 200, generator=g)
    alone = torch.cat([kernels.gemm_bf16(x[i:i + 1], w) for i in range(40)])
    for m in (2, 7, 8, 13, 40):
        assert torch.equal(kernels.gemm_bf16(x[:m], w), alone[:m])
    q, s = quantize_int8(w.float())
    alone = torch.cat([kernels.gemm_int8(x[i:i + 1], q, s) for i in range(40)])
    assert torch.equal(kernels.gemm_int8(x, q, s), alone)


def test_weight_only_linear_paths_agree():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 40)
    for storage in ("bf16", "int8"):
        wol = WeightOnlyLinear.quantize(lin.weight.data, lin.bias, storage)
        few, many = torch.randn(3, 64, generator=g), torch.randn(kernels.MAX_ROWS + 1, 64, generator=g)
        ref = lambda x, wol=wol: x @ wol.dequantized().T + wol.bias
        # a few rows go through the kernel (int8: on int16-rounded inputs), many through torch's float32 GEMM
        few_in = few if storage == "bf16" else torch.mul(*kernels.quantize_rows_int16(few))
        assert torch.allclose(wol(few), ref(few_in), atol=1e-5) and torch.allclose(wol(many), ref(many), atol=1e-5)


def test_int8_rounding_error_is_bounded():
    w = torch.randn(50, 80)
    q, scale = quantize_int8(w)
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("bf16"), make_config(), seed=4, dtype=torch.bfloat16,
                            tokenizer=False)


def test_bf16_storage_float32_compute_equals_reference_float32(bf16_ckpt, hf_model_factory, parity_report):
    # same math as the reference run in float32 on the bf16 weights: the only difference is summation order
    ours = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    assert ours.dtype == torch.float32 and ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ref = hf_model_factory(bf16_ckpt, dtype=torch.float32, attn="sdpa")
    batch = build(CASES["left-padded batch: text / image / video"], seed=12)
    with torch.no_grad():
        a, b = ours(**batch), ref(**batch).logits
    keep = batch["attention_mask"].bool()
    parity_report("logits, bf16 weights + f32 compute (CPU kernels) vs reference f32",
                  (a - b)[keep].abs().max().item(), 1e-4)
    tokens = torch.stack([s.tokens for s in generate_steps(ours, Prompt.from_batch(batch), greedy, 24)], dim=1)
    with torch.no_grad():
        expected = ref.generate(**batch, max_new_tokens=24, min_new_tokens=24, do_sample=False, top_k=None,
                                top_p=None, temperature=None, repetition_penalty=1.0, pad_token_id=151643)
    assert torch.equal(tokens, expected[:, batch["input_ids"].shape[1]:])


def test_plain_bf16_path_still_available(bf16_ckpt, hf_model_factory, parity_report):
    # cpu_kernels=False: bf16 PyTorch as the reference runs it in bf16, compared with that run
    plain = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, cpu_kernels=False)
    assert plain.dtype == torch.bfloat16 and isinstance(plain.lm_head, torch.nn.Linear)
    ref = hf_model_factory(bf16_ckpt, dtype=torch.bfloat16, attn="sdpa")
    batch = build(CASES["one image"], seed=1)
    with torch.no_grad():
        a, b = plain(**batch).float(), ref(**batch).logits.float()
    parity_report("logits, plain bf16 path vs reference bf16, max |diff| / max |logit|",
                  (a - b).abs().max().item() / b.abs().max().item(), 0.0)


def test_int8_drift_and_greedy_agreement(bf16_ckpt, parity_report):
    bf16 = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    int8 = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, quantize="int8")
    assert int8.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    batch = build(CASES["left-padded batch: text / image / video"], seed=13)
    with torch.no_grad():
        a, b = bf16(**batch), int8(**batch)
    keep = batch["attention_mask"].bool()
    rel = (a - b)[keep].abs().max().item() / a[keep].abs().max().item()
    parity_report("int8 vs bf16 logits, max |diff| / max |logit|", rel, 0.05)
    # greedy over 64 tokens: how long the free-running outputs stay identical, and, teacher-forced on the bf16
    # continuation, at how many of the 64 steps int8 picks the same token
    prompt = Prompt.from_batch(batch)
    ta = torch.stack([s.tokens for s in generate_steps(bf16, prompt, greedy, 64)], dim=1)
    tb = torch.stack([s.tokens for s in generate_steps(int8, prompt, greedy, 64)], dim=1)
    common = [int((ta[r] != tb[r]).nonzero()[0]) if (ta[r] != tb[r]).any() else 64 for r in range(ta.shape[0])]
    full = {**batch, "input_ids": torch.cat([batch["input_ids"], ta], 1),
            "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(ta)], 1)}
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        forced = int8(**full)[:, L - 1:-1].argmax(-1)
    agree = (forced == ta).float().mean().item()
    print(f"int8 greedy: identical prefix per row {common}; teacher-forced agreement {agree:.3f}")
    parity_report("int8 vs bf16 teacher-forced greedy disagreement, 64 tokens x 3 rows", 1 - agree, 0.25)


def test_weight_only_linear_follows_its_parameters():
    # the kernel is bound to the parameters once; replacing or converting them must not leave it stale
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(24, 64, generator=g), torch.randn(2, 64, generator=g)
    lin = WeightOnlyLinear.quantize(w, None, "bf16")
    first = lin(x)
    lin.weight = torch.nn.Parameter((w * 2).to(torch.bfloat16), requires_grad=False)
    assert torch.allclose(lin(x), 2 * first, atol=1e-5)
    lin.float()  # float32 weights: no kernel applies, plain F.linear
    assert lin.weight.dtype == torch.float32 and torch.allclose(lin(x), 2 * first, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 1536), (2, 5, 72), (3, 8)])
def test_rms_norm_kernel_matches_the_module(shape):
    from qwen2vl.model.layers import RMSNorm

    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3
    norm = RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.randn(shape[-1], generator=g)
    got = kernels.rms_norm(x, norm.weight.data, 1e-6)
    assert got.shape == x.shape and torch.allclose(got, norm(x), rtol=1e-6, atol=1e-6)
    assert kernels.rms_norm(x.to(torch.bfloat16), norm.weight.data, 1e-6) is None  # not float32: caller's torch path
    assert kernels.rms_norm(x.transpose(0, -1), norm.weight.data, 1e-6) is None  # not contiguous


def test_rope_kernel_matches_apply_rope_in_place():
    from qwen2vl.model.layers import apply_rope

    g = torch.Generator().manual_seed(9)
    for b, heads, n, d in ((1, 12, 1, 128), (2, 3, 7, 24)):
        cos, sin = torch.randn(b, 1, n, d, generator=g), torch.randn(b, 1, n, d, generator=g)
        x = torch.randn(b, n, heads, d, generator=g).transpose(1, 2)  # a projection's output viewed per head
        want = apply_rope(x, cos, sin)
        got = kernels.rope_(x, cos, sin)
        assert got is x and torch.allclose(x, want, rtol=1e-6, atol=1e-6)
    heads_first = torch.randn(2, 3, 7, 24, generator=g)  # (B, heads, L, D) in memory: not this kernel's layout
    untouched = heads_first.clone()
    assert kernels.rope_(heads_first, cos, sin) is None and torch.equal(heads_first, untouched)


def test_cpu_transform_installs_the_small_kernels(bf16_ckpt):
    from qwen2vl.cpu import FastRMSNorm, fast_rope

    model = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    layer = model.model.layers[0]
    assert type(layer.input_layernorm) is FastRMSNorm and type(model.model.norm) is FastRMSNorm
    assert layer.self_attn.rope is fast_rope
