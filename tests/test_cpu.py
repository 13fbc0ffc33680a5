"""CPU fast path: the weight-streaming kernels against plain PyTorch, and bf16/int8 models against the reference."""

from __future__ import annotations

import pytest
import torch

import qwen2vl
from model_inputs import CASES, build
from qwen2vl import kernels
from qwen2vl.cpu import WeightOnlyLinear, quantize_int8
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.testing.checkpoint import TINY_TEXT, make_config, write_checkpoint


@pytest.fixture(params=[v.name for v in kernels.VARIANTS])
def variant(request):
    """Each kernel variant in turn, forced on; one this CPU lacks is skipped, saying so."""
    if request.param not in kernels.supported():
        lacks = next(v.cpu_flags for v in kernels.VARIANTS if v.name == request.param)
        pytest.skip(f"this CPU lacks one of {sorted(lacks)}")
    kernels.use(request.param)
    assert kernels.variant() == request.param and kernels.available()
    yield request.param
    kernels.use(None)


@pytest.fixture(params=[v.name for v in kernels.VARIANTS] + ["off"])
def decode_path(request):
    """Each kernel variant in turn, then the plain-PyTorch fallback with all of them off."""
    if request.param != "off" and request.param not in kernels.supported():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    kernels.use(request.param)
    yield request.param
    kernels.use(None)


def test_kernels_build_here():
    # CI's machine has a C compiler and AVX2: the fast path must really be exercised there, and every variant the
    # CPU supports must build (which one runs may be the faster by a timing, qwen2vl.machine)
    assert kernels.available() and kernels.variant() in kernels.supported()
    assert all(kernels.builds(name) for name in kernels.supported())


def test_kernels_can_be_switched_off(bf16_ckpt):
    kernels.use("off")
    try:
        assert not kernels.available() and kernels.variant() is None
        model = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
        assert "torch" in model.cpu_choice.gemv
    finally:
        kernels.use(None)
    with pytest.raises(ValueError, match="unknown kernel variant"):
        kernels.use("avx1024")


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 64])
@pytest.mark.parametrize("k", [8, 24, 72, 96, 200, 264, 1536])  # every tail: k % 32 in {8, 16, 24, 0}, k % 128
def test_kernels_match_torch(m, k, variant):
    g = torch.Generator().manual_seed(m * 1000 + k)
    w = torch.randn(37, k, generator=g)
    x, bias = torch.randn(m, k, generator=g) * torch.rand(k, generator=g) * 4, torch.randn(37, generator=g)
    wb = w.to(torch.bfloat16)
    ref = x.double() @ wb.double().T + bias.double()
    got = kernels.gemm_bf16(x, wb, bias)
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # bf16 inputs (the products of a model computing in bf16): x rounded to bf16 as torch rounds, then float32 sums
    ref = x.to(torch.bfloat16).double() @ wb.double().T + bias.double()
    got = kernels.gemm_bf16(x, wb, bias, inputs="bf16")
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


def test_bf16_inputs_run_as_bf16_pairs_where_the_cpu_has_them(variant):
    # AVX-512 BF16: one instruction per 32 weights and row; elsewhere the float32 kernel on rounded inputs
    has_pairs = variant == "avx512" and "avx512_bf16" in kernels._cpu_flags()
    assert kernels.native_bf16_inputs(variant) == has_pairs
    product = kernels.WeightOnlyMatmul(torch.ones(16, 64, dtype=torch.bfloat16), inputs="bf16")
    assert product.kind == ("bf16 pairs" if has_pairs else "bf16 on rounded x")
    x = torch.full((1, 64), 1 + 2**-9)  # rounds to 1 in bf16 (ties to even); float32 inputs would give 64.125
    assert product(x).eq(64.0).all()
    with pytest.raises(ValueError, match="inputs"):
        kernels.WeightOnlyMatmul(torch.ones(16, 64, dtype=torch.int8), torch.ones(16), inputs="bf16")
    nan = torch.tensor([[float("nan")] + [0.0] * 63])
    assert product(nan).isnan().all()


def attention_statement(q, k, v):
    """kernels.attention_bf16's arithmetic in PyTorch (float32; round to bf16 for its result): scores of the bf16
    rows, exponentials of each score less its row's maximum, rounded to bf16 for the product with v, divided by
    their float32 sum."""
    qf, kf, vf = (t.float().transpose(0, 1) for t in (q, k, v))  # (heads, rows, D)
    s = qf @ kf.transpose(1, 2) * q.shape[-1] ** -0.5
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return ((e.bfloat16().float() @ vf) / e.sum(-1, keepdim=True)).transpose(0, 1)


def sdpa_rows(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)


needs_bf16_attention = pytest.mark.skipif(
    not kernels.bf16_attention_runs(), reason="this CPU lacks AVX-512 BF16 (the attention kernel's instructions)"
)


@needs_bf16_attention
@pytest.mark.parametrize(
    "nq, nk, heads, d, spread",
    [
        (37, 37, 3, 12, 1),
        (1, 1, 1, 2, 1),
        (5, 33, 1, 7, 1),
        (100, 100, 2, 80, 4),
        (64, 64, 2, 128, 1),
        (300, 300, 4, 16, 6),
    ],
)
def test_bf16_attention_kernel_is_its_pytorch_statement_and_sdpas_equal(nq, nk, heads, d, spread):
    # the vision tower's attention under bf16 products: rows as the tower holds them (k and v views of one qkv
    # product), any head size, key counts that fill no 16-key block, sharp and flat softmaxes (spread)
    g = torch.Generator().manual_seed(nq + d)
    qkv = torch.randn(nk, 3, heads, d, generator=g).mul(torch.tensor([spread, 1, 1]).view(1, 3, 1, 1)).bfloat16()
    q, k, v = qkv[:nq, 0], qkv[:, 1], qkv[:, 2]
    out = torch.full((nq, heads, d), float("nan"), dtype=torch.bfloat16)
    assert kernels.attention_bf16(q, k, v, out)
    want = attention_statement(q, k, v)
    # float32 sums in another order, e^x to ~1e-7: at most one bf16 rounding step apart from the statement's
    assert ((out.float() - want).abs() <= want.abs() * 2**-8 + 2**-12 * v.float().abs().max()).all()
    assert (out.float() == want.bfloat16().float()).float().mean() > 0.9
    # as accurate as torch's flash attention on the same bf16 rows, against float32 attention
    exact = sdpa_rows(q.float(), k.float(), v.float())
    ours, theirs = ((t.float() - exact).abs().mean().item() for t in (out, sdpa_rows(q, k, v)))
    assert ours <= 1.05 * theirs, (ours, theirs)


@needs_bf16_attention
def test_bf16_attention_kernel_rows_and_heads_alone_declines_and_nan():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(90, 4, 24, generator=g).bfloat16() for _ in range(3))
    whole = torch.empty_like(q)
    assert kernels.attention_bf16(q, k, v, whole)
    part = torch.zeros_like(q)
    for rows, heads in ((slice(0, 13), slice(1, 3)), (slice(13, 90), slice(0, 4)), (slice(0, 13), slice(0, 1))):
        assert kernels.attention_bf16(q[rows, heads], k[:, heads], v[:, heads], part[rows, heads])
    assert torch.equal(part[:13, :3], whole[:13, :3]) and torch.equal(part[13:], whole[13:])  # the same bits
    assert (part[:13, 3] == 0).all()  # nothing outside its rows and heads written
    out = torch.empty_like(q)
    assert not kernels.attention_bf16(q.float(), k.float(), v.float(), out.float())  # bf16 only
    assert not kernels.attention_bf16(q.clone().requires_grad_(), k, v, out)  # no autograd: PyTorch's path
    assert not kernels.attention_bf16(q, k[:, :3], v[:, :3], out)  # heads disagree
    assert not kernels.attention_bf16(q, k[:, :, :12], v[:, :, :12], out)  # head sizes disagree
    assert not kernels.attention_bf16(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), out.transpose(0, 1))
    assert kernels.attention_bf16(q[:0], k, v, out[:0])  # no query rows: nothing to do
    k = k.clone()
    k[5, 2, 0] = float("nan")  # one key of head 2: that head's every row is NaN, as sdpa's, the others are not
    assert kernels.attention_bf16(q, k, v, out)
    assert out[:, 2].isnan().all() and not out[:, [0, 1, 3]].isnan().any()
    kernels.use("off")
    try:
        assert not kernels.attention_bf16(q, k, v, out) and not kernels.bf16_attention_runs()
    finally:
        kernels.use(None)


@needs_bf16_attention
def test_bf16_vision_rope_kernel_gives_the_pytorch_bits():
    from qwen2vl.model.layers import apply_rope

    g = torch.Generator().manual_seed(11)
    for n, heads, d in ((50, 3, 12), (7, 2, 80), (33, 1, 34), (4, 16, 160)):  # halves of 6, 40, 17, 80 columns
        wide = torch.randn(n, 3 * heads * d + 8, generator=g).mul(4).bfloat16()  # rows of a wider product
        qkv = wide[:, : 3 * heads * d].view(n, 3, heads, d)
        for cos_sin in ("halves repeated", "any"):  # the tower's tables repeat their halves; the kernel need not
            angles = torch.randn(n, d // 2, generator=g).repeat(1, 2) if cos_sin == "halves repeated" else None
            angles = torch.randn(n, d, generator=g) * 10 if angles is None else angles
            cos, sin = angles.cos(), angles.sin()
            q, k = kernels.rope_bf16(qkv, cos, sin)
            for i, got in ((0, q), (1, k)):
                want = apply_rope(qkv[:, i].float(), cos[:, None], sin[:, None]).bfloat16()
                assert got.is_contiguous() and torch.equal(got, want), (n, heads, d, cos_sin, i)
    assert kernels.rope_bf16(qkv.float(), cos, sin) is None  # bf16 only
    assert kernels.rope_bf16(qkv.detach().requires_grad_(), cos, sin) is None  # no autograd through the kernel
    assert kernels.rope_bf16(qkv[..., :-1], cos[:, :-1].contiguous(), sin[:, :-1].contiguous()) is None  # odd D
    assert kernels.rope_bf16(qkv, cos[:-1], sin[:-1]) is None  # a row without its angles
    assert kernels.rope_bf16(qkv.transpose(1, 2), cos, sin) is None  # not a projection's layout


def test_bf16_attention_runs_exactly_where_the_cpu_has_avx512_bf16():
    assert kernels.bf16_attention_runs() == ("avx512" in kernels.supported() and "avx512_bf16" in kernels._cpu_flags())
    assert not kernels.bf16_attention_runs("avx2")


def test_int16_rounding_of_kernel_inputs():
    assert kernels.XMAX == 127 * 256  # the 4-bit product splits q into two signed bytes
    x = torch.tensor([[0.0] * 8 + [1.0, -2.0, 0.5, 3.0] * 2 + [0.0] * 112 + [1e-3] * 8])
    q, s = kernels.quantize_rows_int16(x)
    assert q[0, 8:16].tolist() == [10837, -21675, 5419, 32512] * 2  # round(v / (3 / 32512))
    assert (s[0, :128] == torch.tensor(3.0) / 32512).all() and (s[0, 128:] == torch.tensor(1e-3) / 32512).all()
    assert (q[0, :8] == 0).all() and (q[0, 128:] == 32512).all() and q.shape == (1, 136)
    ties = torch.tensor([[32512.0, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, 0.0]])  # scale exactly 1: halves go to even
    assert kernels.quantize_rows_int16(ties)[0].tolist() == [[32512, 2, 4, -2, 0, 0, 2, 0]]
    nan = torch.zeros(1, 136)
    nan[0, 3] = float("nan")
    s = kernels.quantize_rows_int16(nan)[1]
    assert s[0, :128].isnan().all() and (s[0, 128:] == 1).all()  # the NaN's group only
    zeros = torch.zeros(2, 16)
    assert (kernels.quantize_rows_int16(zeros)[1] == 1).all()  # an all-zero group keeps scale 1, not 0/0


def test_integer_products_keep_a_nan_input_nan(variant):
    # the products round x to integers, which have no NaN: the group's scale carries it, as the float product would
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 256, generator=g)
    x[1, 200] = float("nan")
    w8, scale = torch.randint(-127, 128, (40, 256), dtype=torch.int8, generator=g), torch.rand(40, generator=g)
    products = [kernels.WeightOnlyMatmul(w8, scale)]
    if kernels.int16_q4_inputs(variant):
        q = torch.randint(0, 256, (40, 128), dtype=torch.uint8, generator=g)
        s, z = torch.rand(40, 2, generator=g).half(), torch.randint(0, 16, (40, 2), dtype=torch.int16, generator=g)
        products.append(kernels.Q4Product(q, s, z, 128, inputs="int16"))
    for product in products:
        y = product(x)
        assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_a_rows_result_does_not_depend_on_its_batch(variant):
    # batched decoding must give each row exactly what decoding it alone gives
    g = torch.Generator().manual_seed(3)
    w = torch.randn(70, 200, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 200, generator=g)
    alone = torch.cat([kernels.gemm_bf16(x[i : i + 1], w) for i in range(40)])
    for m in (2, 7, 8, 13, 40):
        assert torch.equal(kernels.gemm_bf16(x[:m], w), alone[:m])
    alone = torch.cat([kernels.gemm_bf16(x[i : i + 1], w, inputs="bf16") for i in range(40)])
    for m in (2, 7, 8, 13, 40):
        assert torch.equal(kernels.gemm_bf16(x[:m], w, inputs="bf16"), alone[:m])
    q, s = quantize_int8(w.float())
    alone = torch.cat([kernels.gemm_int8(x[i : i + 1], q, s) for i in range(40)])
    assert torch.equal(kernels.gemm_int8(x, q, s), alone)


def test_weight_only_linear_paths_agree(variant):
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
    return write_checkpoint(
        tmp_path_factory.mktemp("bf16"), make_config(), seed=4, dtype=torch.bfloat16, tokenizer=False
    )


def test_bf16_storage_float32_compute_equals_reference_float32(bf16_ckpt, hf_model_factory, parity_report, decode_path):
    # same math as the reference run in float32 on the bf16 weights: the only difference is summation order
    ours = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    assert (decode_path in ours.cpu_choice.gemv.lower()) or (decode_path == "off" and "torch" in ours.cpu_choice.gemv)
    assert ours.dtype == torch.float32 and ours.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ref = hf_model_factory(bf16_ckpt, dtype=torch.float32, attn="sdpa")
    batch = build(CASES["left-padded batch: text / image / video"], seed=12)
    with torch.no_grad():
        a, b = ours(**batch), ref(**batch).logits
    keep = batch["attention_mask"].bool()
    parity_report(
        f"logits, bf16 weights + f32 compute ({decode_path} decode path) vs reference f32",
        (a - b)[keep].abs().max().item(),
        1e-4,
    )
    step_logits = []

    def greedy_recording(logits, seen):
        step_logits.append(logits.clone())
        return greedy(logits, seen)

    steps = generate_steps(ours, Prompt.from_batch(batch), greedy_recording, 24)
    tokens = torch.stack([s.tokens for s in steps], dim=1)
    with torch.no_grad():
        expected = ref.generate(
            **batch,
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            repetition_penalty=1.0,
            pad_token_id=151643,
            return_dict_in_generate=True,
            output_logits=True,
        )
    assert torch.equal(tokens, expected.sequences[:, batch["input_ids"].shape[1] :])
    # every decode step's logits, not only its argmax: the steps embed, rotate and cache in float32 as well
    parity_report(
        f"decode-step logits, bf16 weights + f32 compute ({decode_path} decode path) vs reference f32",
        max((a - b).abs().max().item() for a, b in zip(step_logits, expected.logits, strict=True)),
        1e-4,
    )


def test_plain_bf16_path_still_available(bf16_ckpt, hf_model_factory, parity_report):
    # cpu_kernels=False: bf16 PyTorch as the reference runs it in bf16, compared with that run
    plain = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, cpu_kernels=False)
    assert plain.dtype == torch.bfloat16 and isinstance(plain.lm_head, torch.nn.Linear)
    ref = hf_model_factory(bf16_ckpt, dtype=torch.bfloat16, attn="sdpa")
    batch = build(CASES["one image"], seed=1)
    with torch.no_grad():
        a, b = plain(**batch).float(), ref(**batch).logits.float()
    parity_report(
        "logits, plain bf16 path vs reference bf16, max |diff| / max |logit|",
        (a - b).abs().max().item() / b.abs().max().item(),
        0.0,
    )


# int4's limits guard against a broken quantizer (a wrong zero point, scale or nibble order sends the relative
# difference above 1 and the agreement towards 0), not a quality promise: 4 bits on random weights measured 0.61 and
# 0.63 (docs/model.md), int8 0.039 and 0.094
@pytest.mark.parametrize("bits, max_rel, max_disagree", [("int8", 0.05, 0.25), ("int4", 0.8, 0.75)])
def test_quantized_drift_and_greedy_agreement(bf16_ckpt, parity_report, bits, max_rel, max_disagree):
    from qwen2vl.quant import QuantLinear

    bf16 = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False)
    int8 = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, quantize=bits)
    q_proj = int8.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.int8 if bits == "int8" else isinstance(q_proj, QuantLinear)
    batch = build(CASES["left-padded batch: text / image / video"], seed=13)
    with torch.no_grad():
        a, b = bf16(**batch), int8(**batch)
    keep = batch["attention_mask"].bool()
    rel = (a - b)[keep].abs().max().item() / a[keep].abs().max().item()
    parity_report(f"{bits} vs bf16 logits, max |diff| / max |logit|", rel, max_rel)
    # greedy over 64 tokens: how long the free-running outputs stay identical, and, teacher-forced on the bf16
    # continuation, at how many of the 64 steps int8 picks the same token
    prompt = Prompt.from_batch(batch)
    ta = torch.stack([s.tokens for s in generate_steps(bf16, prompt, greedy, 64)], dim=1)
    tb = torch.stack([s.tokens for s in generate_steps(int8, prompt, greedy, 64)], dim=1)
    common = [int((ta[r] != tb[r]).nonzero()[0]) if (ta[r] != tb[r]).any() else 64 for r in range(ta.shape[0])]
    full = {
        **batch,
        "input_ids": torch.cat([batch["input_ids"], ta], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(ta)], 1),
    }
    L = batch["input_ids"].shape[1]
    with torch.no_grad():
        forced = int8(**full)[:, L - 1 : -1].argmax(-1)
    agree = (forced == ta).float().mean().item()
    print(f"{bits} greedy: identical prefix per row {common}; teacher-forced agreement {agree:.3f}")
    parity_report(f"{bits} vs bf16 teacher-forced greedy disagreement, 64 tokens x 3 rows", 1 - agree, max_disagree)


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
def test_rms_norm_kernel_matches_the_module(shape, variant):
    from qwen2vl.model.layers import RMSNorm

    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g) * 3
    norm = RMSNorm(shape[-1], 1e-6)
    norm.weight.data = torch.randn(shape[-1], generator=g)
    got = kernels.rms_norm(x, norm.weight.data, 1e-6)
    assert got.shape == x.shape and torch.allclose(got, norm(x), rtol=1e-6, atol=1e-6)
    assert kernels.rms_norm(x.to(torch.bfloat16), norm.weight.data, 1e-6) is None  # not float32: caller's torch path
    assert kernels.rms_norm(x.transpose(0, -1), norm.weight.data, 1e-6) is None  # not contiguous


def test_rope_kernel_matches_apply_rope_in_place(variant):
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


def _q4_reference(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    """The formats' weight: float16((q - z) * s) per group, (N, K)."""
    zk, sk = (t.repeat_interleave(group, dim=1)[:, : q.shape[1]] for t in (z, s))
    return (q.to(torch.int16) - zk).to(torch.float16) * sk


@pytest.mark.parametrize("m", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("k, group", [(64, 32), (256, 128), (288, 96), (1536, 128), (160, 160)])
def test_q4_kernel_multiplies_the_reference_float16_weights(m, k, group, variant):
    g = torch.Generator().manual_seed(m * 7 + k)
    n, groups = 29, -(-k // group)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 17, (n, groups), generator=g, dtype=torch.int16)  # GPTQ v1 may store 16 (field + 1)
    s = (torch.rand(n, groups, generator=g) * 0.05 + 1e-3).to(torch.float16)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    want = x.double() @ _q4_reference(q, s, z, group).double().T + bias.double()
    got = kernels.Q4Product(packed, s, z, group, bias)(x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    # a row's result does not depend on the rows beside it (batched decoding = decoding alone)
    alone = torch.cat([kernels.Q4Product(packed, s, z, group, bias)(x[i : i + 1]) for i in range(m)])
    assert torch.equal(got, alone)
    # bf16 pairs (models computing in bf16, CPUs with AVX-512 BF16): x and the float16 weights rounded to bf16
    if not (kernels.native_bf16_inputs(variant) and kernels.Q4Product.pairs_fit(k, group)):
        with pytest.raises(ValueError, match="inputs"):
            kernels.Q4Product(packed, s, z, group, bias, inputs="bf16")
        return
    pairs = kernels.Q4Product(packed, s, z, group, bias, inputs="bf16")
    w16 = _q4_reference(q, s, z, group).to(torch.bfloat16)
    want = x.to(torch.bfloat16).double() @ w16.double().T + bias.double()
    got = pairs(x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got, torch.cat([pairs(x[i : i + 1]) for i in range(m)]))


@pytest.mark.parametrize("m", [1, 3, 4, 5, 9])
@pytest.mark.parametrize("k, group", [(128, 128), (384, 128), (1536, 128), (512, 256), (640, 640), (256, 64)])
def test_q4_kernel_on_int16_rounded_inputs(m, k, group, variant):
    # the integer product (models computing in bf16): x rounded as quantize_rows_int16 rounds it, the weight
    # (q - z) * s unrounded; int16_reference states it, and each variant must equal it up to float32 summation
    g = torch.Generator().manual_seed(m * 5 + k + group)
    n, groups = 37, -(-k // group)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    z = torch.randint(0, 17, (n, groups), generator=g, dtype=torch.int16)
    s = (torch.rand(n, groups, generator=g) * 0.05 + 1e-3).to(torch.float16)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    x[0, :128] = 0  # an all-zero group (scale 1)
    x[-1, -128:] *= 1e-4  # a quiet group beside loud ones: each group has its own scale
    if not (kernels.int16_q4_inputs(variant) and kernels.Q4Product.int16_fits(k, group)):
        with pytest.raises(ValueError, match="inputs"):
            kernels.Q4Product(packed, s, z, group, bias, inputs="int16")
        return
    product = kernels.Q4Product(packed, s, z, group, bias, inputs="int16")
    assert product.kind == "4-bit int16 inputs"
    want = kernels.Q4Product.int16_reference(x, packed, s, z, group) + bias.double()
    got = product(x)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(got, torch.cat([product(x[i : i + 1]) for i in range(m)]))
    # and the statement is what it says: the float16 weights' product on unrounded x, within the rounding of both
    exact = x.double() @ _q4_reference(q, s, z, group).double().T + bias.double()
    assert (got.double() - exact).abs().max() <= 2e-3 * exact.abs().max()


def test_q4_kernel_refuses_what_it_cannot_run():
    assert not kernels.Q4Product.supports(80, 32) and not kernels.Q4Product.supports(128, 48)
    with pytest.raises(ValueError, match="multiples of 32"):
        kernels.Q4Product(
            torch.zeros(4, 40, dtype=torch.uint8),
            torch.ones(4, 1, dtype=torch.float16),
            torch.zeros(4, 1, dtype=torch.int16),
            80,
        )


@pytest.mark.parametrize("permuted", [False, True])
def test_quantized_layer_decodes_through_the_4bit_kernel(variant, permuted):
    from qwen2vl.quant import QuantLinear

    g = torch.Generator().manual_seed(11 + permuted)
    k, n, group = 256, 40, 64
    layer = QuantLinear(k, n, 4, group, bias=True, permuted=permuted, bias_dtype=torch.float32)
    state = {
        "qweight": torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8),
        "scales": (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(torch.float16),
        "zeros": torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.int16),
        "bias": torch.randn(n, generator=g),
    }
    if permuted:
        state["perm"] = torch.randperm(k, generator=g)
    layer.load_state_dict(state, assign=True)
    x = torch.randn(2, 3, k, generator=g)
    want = x.double() @ layer.dequantize().double().T + state["bias"].double()
    got = layer(x)
    assert layer._cpu_product() is not None and got.shape == (2, 3, n)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    many = torch.randn(kernels.MAX_ROWS + 1, k, generator=g)  # many rows: the plain path, same numbers
    assert torch.allclose(
        layer(many).double(),
        many.double() @ layer.dequantize().double().T + state["bias"].double(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_int4_round_to_nearest_follows_the_awq_formula():
    from qwen2vl.quant.formats import unpack_nibbles
    from qwen2vl.quant.rtn import quantize_rtn

    g = torch.Generator().manual_seed(2)
    for k, group in ((256, 128), (200, 64), (96, 128)):  # whole groups, a short last group, one short group
        w = torch.randn(17, k, generator=g) * 0.05
        st = quantize_rtn(w, group)
        q = unpack_nibbles(st.qweight, k)
        assert st.qweight.dtype == torch.uint8 and st.scales.dtype == torch.float16 and st.perm is None
        assert int(q.max()) <= 15 and int(st.zeros.min()) >= 0 and int(st.zeros.max()) <= 15
        deq = _q4_reference(q, st.scales, st.zeros, group).float()
        # round to nearest: every weight within half a step of its group's scale (plus float16 rounding)
        step = st.scales.float().repeat_interleave(group, dim=1)[:, :k]
        assert ((deq - w).abs() <= step / 2 + 1e-3 * w.abs() + 1e-6).all()


def _all_quantizers(w: torch.Tensor, group: int) -> tuple:
    from qwen2vl.quant.rtn import quantize_rtn

    st = quantize_rtn(w, group)
    # reduce_rows: a stand-in for tensor parallelism's all-reduce of the rows' largest |w|
    return (st.qweight, st.scales, st.zeros), quantize_int8(w), quantize_int8(w, lambda a: a.mul_(1.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_time_quantizers_equal_their_pytorch_statement(variant, dtype, monkeypatch):
    """int8 rows and 4-bit groups quantized by the kernels at load: the same bits as the PyTorch statements, for
    bf16 and float32 weights, short and single groups, odd widths, all-zero rows and groups, tiny ranges, -0; the
    kernels' side a block of 4 rows at a time, the PyTorch side in one block."""
    g = torch.Generator().manual_seed(7)
    for n, k, group in ((37, 300, 128), (64, 1536, 128), (5, 33, 32), (3, 7, 4), (4, 130, 130), (9, 256, 64)):
        w = torch.randn(n, k, generator=g) * 0.05
        w[0], w[1, : min(group, k)], w[2, :3] = 0.0, 0.0, torch.tensor([1e-9, -0.0, 3e-8])
        w[-1] *= 1e-6  # a range below float16's resolution
        w = w.to(dtype)

        assert kernels.quantize_q4_rows(w, group) is not None and kernels.row_absmax(w) is not None
        with monkeypatch.context() as patch:
            patch.setattr(kernels, "ROWS_AT_ONCE", 4)
            got = _all_quantizers(w, group)
        kernels.use("off")
        try:
            assert kernels.quantize_q4_rows(w, group) is None
            want = _all_quantizers(w, group)
        finally:
            kernels.use(variant)
        for got_part, want_part in zip(got, want):
            assert all(torch.equal(a, b) for a, b in zip(got_part, want_part)), (n, k, group)


def test_4bit_dequantization_kernel_equals_pytorch(variant):
    """The weight a 4-bit layer's many-row product multiplies: the kernel's float32 (exact) and bf16 forms equal
    `dequantize_stored().to(dtype)` bit for bit, GPTQ's zero of 16 and a short last group included."""
    from qwen2vl.quant import QuantLinear
    from qwen2vl.quant.rtn import quantize_rtn

    g = torch.Generator().manual_seed(3)
    for n, k, group in ((37, 300, 128), (64, 1536, 128), (5, 33, 32), (6, 7, 4)):
        layer = QuantLinear(k, n, 4, group, bias=False)
        layer.load_state_dict(QuantLinear.state_from(quantize_rtn(torch.randn(n, k, generator=g), group)), assign=True)
        layer.zeros[0, 0], layer.scales[1, 0] = 16, 2.0**-20  # GPTQ v1's all-ones zero field; a subnormal scale
        for dtype in (torch.float32, torch.bfloat16):
            got = kernels.dequantize_q4_rows(layer.qweight, layer.scales, layer.zeros, group, k, dtype)
            assert got is not None and torch.equal(got, layer.dequantize_stored().to(dtype)), (n, k, group, dtype)
            assert torch.equal(layer.weight_as(dtype), got)


def test_4bit_prompt_products_follow_the_models_matmul(tmp_path):
    """Many rows through a 4-bit layer: the exact float32 product, or under bf16 products x and the dequantized
    weight rounded to bf16 for torch's bf16 GEMM (the statement the bf16 checkpoints' layers follow)."""
    from qwen2vl.quant import QuantLinear
    from qwen2vl.quant.rtn import quantize_rtn

    g = torch.Generator().manual_seed(4)
    n, k = 96, 256
    layer = QuantLinear(k, n, 4, 64, bias=True, bias_dtype=torch.float32)
    state = QuantLinear.state_from(quantize_rtn(torch.randn(n, k, generator=g) * 0.1, 64))
    layer.load_state_dict({**state, "bias": torch.randn(n, generator=g)}, assign=True)
    x = torch.randn(2, kernels.MAX_ROWS, k, generator=g)
    w = layer.dequantize_stored()
    exact = x.double() @ w.double().T + layer.bias.double()
    assert (layer(x).double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    layer.matmul = "bf16"
    want = torch.nn.functional.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).float() + layer.bias
    assert torch.equal(layer(x), want)


def test_4bit_layers_take_the_fastest_decode_product_under_bf16_products(tmp_path):
    from qwen2vl.quant import QuantLinear

    # widths that are multiples of 64 as the real models' are (the tiny fixture's 72 and 200 are not): 128 takes the
    # integer product, 192 (the MLP's down projection's K) only bf16 pairs
    text = {**TINY_TEXT, "hidden_size": 128, "intermediate_size": 192, "num_attention_heads": 4}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 4, 4]}
    vision = {"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 128}
    ckpt = write_checkpoint(tmp_path, make_config(text, vision), seed=5, dtype=torch.bfloat16, tokenizer=False)
    exact = qwen2vl.load_model(ckpt, dtype=torch.bfloat16, progress=False, quantize="int4")
    fast = qwen2vl.load_model(ckpt, dtype=torch.bfloat16, progress=False, quantize="int4", cpu_matmul="bf16")
    integer, pairs = kernels.int16_q4_inputs(), kernels.native_bf16_inputs()
    layers = {n: m for n, m in fast.named_modules() if isinstance(m, QuantLinear)}
    chosen = {}
    for name, layer in layers.items():
        assert layer.matmul == "bf16" and exact.get_submodule(name).matmul == "float32"
        k, g = layer.in_features, layer.group_size
        want = (
            "4-bit int16 inputs"
            if integer and kernels.Q4Product.int16_fits(k, g)
            else "4-bit bf16 pairs"
            if pairs and kernels.Q4Product.pairs_fit(k, g)
            else "4-bit"
        )
        assert layer._cpu_product().kind == want
        chosen.setdefault(want, name)
    assert set(chosen) == {"4-bit int16 inputs" if integer else "4-bit", "4-bit bf16 pairs" if pairs else "4-bit"}
    # a decode step's rows through each kind: its statement (bf16 pairs: x and w rounded to bf16; int16: x as
    # quantize_rows_int16 rounds it, w unrounded; 4-bit: exact float32)
    x = torch.randn(3, 192)
    for kind, name in chosen.items():
        layer = layers[name]
        rows = x[:, : layer.in_features]
        w = exact.get_submodule(name).dequantize_stored().float()
        if kind == "4-bit int16 inputs":
            want = kernels.Q4Product.int16_reference(rows, layer.qweight, layer.scales, layer.zeros, layer.group_size)
        elif kind == "4-bit bf16 pairs":
            want = rows.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T
        else:
            want = rows.double() @ w.double().T
        want = want + (0 if layer.bias is None else layer.bias.double())
        assert (layer(rows).double() - want).abs().max() <= 1e-5 * want.abs().max()
        layer.matmul = "float32"  # the bound product follows the setting: back to the exact one
        exact_rows = rows.double() @ w.double().T + (0 if layer.bias is None else layer.bias.double())
        assert (layer(rows).double() - exact_rows).abs().max() <= 1e-5 * exact_rows.abs().max()
        assert layer._cpu_product().kind == "4-bit"


def test_quantize_int4_replaces_exactly_the_decoder_projections(bf16_ckpt):
    from qwen2vl.quant import QUANTIZABLE, QuantLinear
    from qwen2vl.quant.rtn import quantize_rtn

    plain = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, cpu_kernels=False)
    int4 = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, quantize="int4")
    names = {n for n, m in int4.named_modules() if isinstance(m, QuantLinear)}
    assert names == {n for n, m in plain.named_modules() if isinstance(m, torch.nn.Linear) and QUANTIZABLE.fullmatch(n)}
    for name in sorted(names)[:5]:
        original = plain.get_submodule(name)
        st = quantize_rtn(original.weight.data)
        layer = int4.get_submodule(name)
        assert torch.equal(layer.qweight, st.qweight) and torch.equal(layer.scales, st.scales)
        assert (layer.bias is None) == (original.bias is None)
    assert int4.lm_head.weight.dtype == torch.int8  # the output projection: int8
    assert int4.visual.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16  # the vision tower keeps bf16


@pytest.mark.parametrize(
    "batch, heads, kv_heads, dim, max_len, pos, masked",
    [
        (1, 12, 2, 128, 100, 0, False),
        (1, 12, 2, 128, 100, 99, False),
        (3, 4, 2, 16, 40, 20, True),
        (2, 6, 6, 24, 10, 9, True),
    ],
)
def test_decode_attention_kernel_equals_sdpa(batch, heads, kv_heads, dim, max_len, pos, masked, variant):
    g = torch.Generator().manual_seed(pos + dim)
    # q, k, v as a projection's output viewed per head: (B, 1, heads, D) transposed
    q, k, v = (torch.randn(batch, 1, n, dim, generator=g).transpose(1, 2) for n in (heads, kv_heads, kv_heads))
    ck, cv = torch.randn(batch, kv_heads, max_len, dim, generator=g), torch.randn(batch, kv_heads, max_len, dim)
    mask = None
    if masked:  # left padding and holes; the new slot is always seen
        mask = torch.rand(batch, 1, 1, pos + 1, generator=g) > 0.3
        mask[..., pos] = True
    want_k, want_v = ck.clone(), cv.clone()
    want_k[:, :, pos : pos + 1], want_v[:, :, pos : pos + 1] = k, v
    want = torch.nn.functional.scaled_dot_product_attention(
        q, want_k[:, :, : pos + 1], want_v[:, :, : pos + 1], attn_mask=mask, enable_gqa=heads != kv_heads
    )
    got = kernels.decode_attention(q, k, v, ck, cv, [pos] * batch, mask)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max())
    assert torch.equal(ck, want_k) and torch.equal(cv, want_v)  # the new key and value are in the cache
    assert got.transpose(1, 2).is_contiguous()  # attention's caller reshapes (B, 1, heads, D) for free


def test_decode_attention_kernel_declines_what_it_does_not_take():
    def rows(heads, dim, length=1):  # a projection's output viewed per head
        return torch.randn(1, length, heads, dim).transpose(1, 2)

    ck, cv = torch.zeros(1, 2, 8, 16), torch.zeros(1, 2, 8, 16)
    q, k = rows(4, 16), rows(2, 16)
    for args in [
        (rows(4, 12), rows(2, 12), rows(2, 12), ck[..., :12].contiguous(), cv[..., :12].contiguous(), [3]),  # D % 8
        (q, k, k, ck, cv, [8]),  # past the cache
        (q, k, k, ck, cv, [3, 4]),  # a position per row: one row here
        (q, k, k, ck, cv, [3], None, [1]),  # no cache row 1
        (q, k, k, ck.transpose(2, 3).contiguous().transpose(2, 3), cv, [3]),  # a cache not contiguous
        (q, k, torch.randn(1, 2, 1, 32)[..., ::2], ck, cv, [3]),  # v with a stride between its numbers
        (q, k, k, ck, cv, [3], torch.ones(1, 1, 1, 4)),  # an additive mask
        (q, k, k, ck, cv, [3], torch.ones(1, 1, 1, 3, dtype=torch.bool)),  # a mask too short for slot 3
        (rows(4, 16, 2), k, k, ck, cv, [3]),  # two queries
    ]:
        assert kernels.decode_attention(*args) is None
    assert (ck == 0).all() and (cv == 0).all()  # declined: nothing written


def test_decode_attention_kernel_with_a_slot_and_position_per_row(variant):
    # the engine's layout: row b at position lengths[b] of cache row slots[b], against per-row SDPA (SlotAttend's
    # PyTorch path)
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.engine.slots import SlotAttend, SlotPool
    from qwen2vl.testing.checkpoint import TINY_VISION

    text = {**TINY_TEXT, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 2, 2]}  # head_dim 16: the kernel takes it
    cfg = Qwen2VLConfig.from_hf_dict(make_config(text, {**TINY_VISION, "hidden_size": 64})).text
    g = torch.Generator().manual_seed(9)
    pools = [SlotPool(cfg, 5, 30, torch.float32) for _ in range(2)]
    for pool in pools[1:]:
        pool.k.copy_(torch.randn(pools[0].k.shape, generator=g))
        pool.v.copy_(torch.randn(pools[0].v.shape, generator=g))
    pools[0].k.copy_(pools[1].k), pools[0].v.copy_(pools[1].v)
    slots, lengths = [3, 0, 4], [7, 29, 0]
    d = cfg.head_dim
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    q, k, v = (torch.randn(3, 1, n, d, generator=g).transpose(1, 2) for n in (heads, kv_heads, kv_heads))
    taken = []

    def kernel(*args):
        out = kernels.decode_attention(*args)
        taken.append(out is not None)
        return out

    fused = SlotAttend(pools[0], slots, lengths, kernel)
    plain = SlotAttend(pools[1], slots, lengths)
    for layer in (0, cfg.num_hidden_layers - 1):
        got, want = fused(layer, q, k, v), plain(layer, q, k, v)
        assert (got - want).abs().max() <= 1e-6 * max(1.0, want.abs().max())
    assert torch.equal(pools[0].k, pools[1].k) and torch.equal(pools[0].v, pools[1].v)
    assert taken == [True, True]  # the kernel took both layers' calls


def test_decode_steps_attend_through_the_kernel(tmp_path, monkeypatch):
    from qwen2vl.testing.checkpoint import TINY_VISION

    text = {**TINY_TEXT, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 2, 2]}  # head_dim 16 (the tiny default's 12 is
    # not a multiple of 8: the kernel declines it and PyTorch runs)
    config = make_config(text, {**TINY_VISION, "hidden_size": 64})
    ckpt = write_checkpoint(tmp_path, config, seed=4, dtype=torch.bfloat16, tokenizer=False)
    model = qwen2vl.load_model(ckpt, dtype=torch.bfloat16, progress=False)
    assert model.model.decode_attention is kernels.decode_attention  # set by the CPU transform
    calls = []
    real = kernels.decode_attention
    monkeypatch.setattr(model.model, "decode_attention", lambda *a: calls.append(real(*a)) or calls[-1])
    fused_attention = model.model.decode_attention
    batch = build(CASES["left-padded batch: text / image / video"], seed=5)
    runs = {}
    for name, fused in (("fused", fused_attention), ("plain", None)):
        model.model.decode_attention = fused
        logits = []
        chooser = lambda lg, seen, logits=logits: logits.append(lg) or greedy(lg, seen)  # noqa: E731
        steps = list(generate_steps(model, Prompt.from_batch(batch), chooser, 6))
        runs[name] = torch.stack([s.tokens for s in steps], 1), torch.stack(logits)
    layers = model.config.text.num_hidden_layers
    # every decode step after the prompt, every layer: the kernel ran
    assert len(calls) == 5 * layers and all(out is not None for out in calls)
    assert torch.equal(runs["fused"][0], runs["plain"][0])
    assert (runs["fused"][1] - runs["plain"][1]).abs().max() <= 1e-4


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_many_row_products_widen_a_block_of_rows_at_a_time(storage, monkeypatch):
    # a prefill's product widens an int8 (or, for float32 products, a bf16) weight a block of rows at a time; the
    # blocks together give the one-shot product, bias included, on every path
    import qwen2vl.cpu as cpu

    g = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(64, 50)
    wol = WeightOnlyLinear.quantize(lin.weight.data, lin.bias, storage)
    x = torch.randn(2, kernels.MAX_ROWS, 64, generator=g)  # more rows than the decode kernels take
    for matmul, rows in (("float32", x), ("bf16", x), ("bf16", x.to(torch.bfloat16))):
        wol.matmul = matmul
        whole = wol(rows)
        monkeypatch.setattr(cpu, "WIDEN_AT_ONCE", 64 * 7)  # 7 rows a block: 8 blocks, the last one short
        blocks = wol(rows)
        monkeypatch.undo()
        assert blocks.dtype == whole.dtype == rows.dtype and blocks.shape == whole.shape == (2, kernels.MAX_ROWS, 50)
        assert (blocks.float() - whole.float()).abs().max() <= 1e-5 * whole.float().abs().max()
        want = rows.float() @ wol.dequantized().T + wol.bias
        tolerance = 1e-5 if matmul == "float32" else 2e-2  # bf16 products: bf16 rounding
        assert (blocks.float() - want).abs().max() <= tolerance * want.abs().max()


def test_many_row_products_widen_equal_round_blocks():
    # MKL ran a ragged column split (819 + 461, 3276 + 1844) 1.3-1.6x slower than the whole product; equal blocks of
    # a multiple of 64 rows cost next to nothing. The 2B's vision and decoder shapes, and small ones:
    from qwen2vl.cpu import WIDEN_AT_ONCE, _block_rows

    for n, k in ((5120, 1280), (1280, 5120), (3840, 1280), (8960, 1536), (1536, 8960), (1536, 1536), (50, 64), (7, 9)):
        size = _block_rows(n, k)
        if n * k <= WIDEN_AT_ONCE:
            assert size == n
            continue
        assert -(-n // size) <= -(-n // (WIDEN_AT_ONCE // k))  # no more blocks than the limit asks for
        assert size <= 64 or size % 64 == 0
        assert size * k < WIDEN_AT_ONCE + 64 * k  # about the limit: rounded up by under 64 rows
    assert _block_rows(1280, 5120) == 640 and _block_rows(5120, 1280) == 2560 and _block_rows(1536, 8960) == 384


def test_bf16_products_encode_through_the_vision_kernels_where_they_run(bf16_ckpt):
    # the load-time choice really routes the vision tower's attention and rotary through the kernels (a hook that
    # declined every call would leave every other test green), and their encode is the PyTorch path's to bf16
    model = qwen2vl.load_model(bf16_ckpt, dtype=torch.bfloat16, progress=False, cpu_matmul="bf16")
    runs = kernels.bf16_attention_runs()
    assert model.cpu_choice.vision_attention == ("avx512_bf16" if runs else "torch")
    blocks = list(model.visual.blocks)
    if not runs:
        assert all(b.attn.fused_attention is None and b.attn.fused_rope is None for b in blocks)
        pytest.skip("this CPU lacks AVX-512 BF16: the choice is PyTorch's path, checked above")
    done = []

    def spy(fn):
        def call(*args):
            done.append((fn.__name__, fn(*args)))
            return done[-1][1]

        return call

    for b in blocks:
        b.attn.fused_attention, b.attn.fused_rope = spy(kernels.attention_bf16), spy(kernels.rope_bf16)
    g = torch.Generator().manual_seed(5)
    grid = torch.tensor([[1, 6, 8], [2, 4, 4]])  # an image and a two-frame video: three attention segments
    pixels = torch.randn(int(grid.prod(-1).sum()), model.config.vision.patch_dim, generator=g)
    with torch.inference_mode():
        fast = model.encode_vision(pixels, grid)
        attention = [ok for name, ok in done if name == "attention_bf16"]
        rope = [qk for name, qk in done if name == "rope_bf16"]
        assert len(attention) == 3 * len(blocks) and all(ok is True for ok in attention)  # ran, not declined
        assert len(rope) == len(blocks) and all(qk is not None for qk in rope)
        for b in blocks:
            b.attn.fused_attention = b.attn.fused_rope = None
        plain = model.encode_vision(pixels, grid)
    err = ((fast - plain).abs().max() / plain.abs().max()).item()
    print(f"vision features, bf16 kernels vs PyTorch under bf16 products: max |diff| / max |feature| {err:.3g}")
    assert err < 2**-6  # a few bf16 steps: the attentions differ in the last bit of some rows, propagated
