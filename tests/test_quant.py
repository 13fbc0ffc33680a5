"""AWQ and GPTQ checkpoints: the readers against the reference dequantizers, the model against transformers.

Oracles: AutoAWQ 0.2.9 `awq/utils/packing_utils.py::dequantize_gemm` and AutoGPTQ 0.7.1
`qlinear_cuda.QuantLinear.forward` (its PyTorch path), loaded from their files so that neither package's CUDA
machinery is imported. Exactness: our float16 weight equals theirs bit for bit; with dtype=float32 our logits equal
transformers' float32 logits on the dense twin (every quantized layer replaced by that float16 weight) within 1e-4,
and greedy tokens are identical.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import qwen2vl
from model_inputs import CASES, build
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.quant import (
    QuantizationError,
    QuantLinear,
    QuantScheme,
    parse_quantization_config,
    read_layer,
)
from qwen2vl.testing.checkpoint import TINY_TEXT, TINY_VISION, make_config
from qwen2vl.testing.quantized import (
    QUANTIZED,
    awq_config,
    gptq_config,
    write_quantized,
)

LIMIT = 1e-4


def _from_file(package: str, relative: str, name: str):
    """Import one file of an installed package without running the package's __init__ (and its CUDA imports)."""
    root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    spec = importlib.util.spec_from_file_location(name, root / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def awq_oracle():
    return _from_file("awq", "utils/packing_utils.py", "awq_packing_oracle").dequantize_gemm


@pytest.fixture(scope="module")
def gptq_oracle():
    qlinear = _from_file("auto_gptq", "nn_modules/qlinear/qlinear_cuda.py", "gptq_qlinear_oracle")

    def dequantize(t: dict[str, torch.Tensor], bits: int, group_size: int, k: int, n: int) -> torch.Tensor:
        layer = qlinear.QuantLinear(bits, group_size, k, n, bias=False)
        # its buffers are sized with `features // 32 * bits`, which is short when 32 does not divide a width;
        # the format (and its forward) take the tensors as they are: K/pf rows, N/pf zero columns
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            setattr(layer, name, t[name].clone())
        with torch.no_grad():  # x = I picks out the weight: each output sums exactly one product
            return layer(torch.eye(k, dtype=torch.float16))  # (K, N)

    return dequantize


def ours(prefix: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme, k: int, n: int) -> torch.Tensor:
    storage = read_layer(prefix, tensors, scheme, k, n)
    layer = QuantLinear(k, n, scheme.bits, scheme.group_size, bias=False, permuted=storage.perm is not None)
    layer.load_state_dict(QuantLinear.state_from(storage), assign=True)
    return layer.dequantize()  # (N, K)


def act_order_g_idx(k: int, g: int, gen: torch.Generator) -> torch.Tensor:
    """A desc_act g_idx: groups of g inputs taken in a random order (GPTQ's order by Hessian diagonal)."""
    out = torch.empty(k, dtype=torch.int32)
    out[torch.randperm(k, generator=gen)] = (torch.arange(k) // g).to(torch.int32)
    return out


def random_bits(shape, gen) -> torch.Tensor:
    return torch.randint(-(2**31), 2**31, shape, generator=gen, dtype=torch.int64).to(torch.int32)


# -- readers against the reference dequantizers, on random bit patterns (every field value, every sign bit) --


@pytest.mark.parametrize("seed", range(6))
def test_awq_reader_equals_autoawq(seed, awq_oracle):
    gen = torch.Generator().manual_seed(seed)
    g = [8, 16, 32, 128, -1, 24][seed]
    groups = int(torch.randint(1, 5, (1,), generator=gen))
    k = (g if g > 0 else int(torch.randint(3, 50, (1,), generator=gen))) * groups
    n = 8 * int(torch.randint(1, 9, (1,), generator=gen))
    ng = 1 if g == -1 else k // g
    t = {
        "qweight": random_bits((k, n // 8), gen),
        "qzeros": random_bits((ng, n // 8), gen),
        "scales": (torch.randn(ng, n, generator=gen) * 0.05).half(),
    }
    expected = awq_oracle(t["qweight"], t["qzeros"], t["scales"], 4, k if g == -1 else g)
    got = ours("layer", t, QuantScheme("awq", 4, g), k, n)
    assert got.dtype == torch.float16 and torch.equal(got, expected.t()), f"k={k} n={n} g={g}"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_gptq_reader_equals_autogptq(bits, desc_act, seed, gptq_oracle):
    gen = torch.Generator().manual_seed(100 * bits + 10 * desc_act + seed)
    pf = 32 // bits
    g = [32, 128, -1][seed]
    k = pf * int(torch.randint(2, 40, (1,), generator=gen))  # not always a multiple of g: a short last group
    n = pf * int(torch.randint(1, 12, (1,), generator=gen))
    gs = k if g == -1 else g
    ng = -(-k // gs)
    g_idx = act_order_g_idx(k, gs, gen) if desc_act else (torch.arange(k) // gs).to(torch.int32)
    t = {
        "qweight": random_bits((k // pf, n), gen),
        "qzeros": random_bits((ng, n // pf), gen),
        "scales": (torch.randn(ng, n, generator=gen) * 0.05).half(),
        "g_idx": g_idx,
    }
    expected = gptq_oracle(t, bits, g, k, n)
    got = ours("layer", t, QuantScheme("gptq", bits, g), k, n)
    assert got.dtype == torch.float16 and torch.equal(got, expected.t()), f"k={k} n={n} g={g}"


def test_forward_is_x_times_dequantized_weight():
    gen = torch.Generator().manual_seed(5)
    k, n = 40, 24
    g_idx = act_order_g_idx(k, 8, gen)
    t = {
        "qweight": random_bits((k // 8, n), gen),
        "qzeros": random_bits((5, n // 8), gen),
        "scales": (torch.randn(5, n, generator=gen) * 0.05).half(),
        "g_idx": g_idx,
    }
    storage = read_layer("layer", t, QuantScheme("gptq", 4, 8), k, n)
    layer = QuantLinear(k, n, 4, 8, bias=True, permuted=True, bias_dtype=torch.float32)
    bias = torch.randn(n, generator=gen)
    layer.load_state_dict({**QuantLinear.state_from(storage), "bias": bias}, assign=True)
    x = torch.randn(3, 5, k, generator=gen)
    expected = x @ layer.dequantize().float().t() + bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


# -- the test packer writes what the references read --

PACKED = [
    ("awq", {"method": "awq", "group_size": 8}),
    ("gptq4", {"method": "gptq", "bits": 4, "group_size": 32}),
    ("gptq4 act-order asym", {"method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False}),
    ("gptq8 act-order", {"method": "gptq", "bits": 8, "group_size": 24, "desc_act": True}),
    ("gptq8 one group", {"method": "gptq", "bits": 8, "group_size": -1, "sym": False}),
]


@pytest.mark.parametrize("case", [c for c, _ in PACKED])
def test_packer_output_read_by_references(case, tmp_path, awq_oracle, gptq_oracle):
    kw = dict(PACKED)[case]
    q = write_quantized(tmp_path / "q", dense_directory=tmp_path / "d", seed=3, **kw)
    cfg = json.loads((q / "config.json").read_text())
    packed, dense = load_file(q / "model.safetensors"), load_file(tmp_path / "d" / "model.safetensors")
    assert cfg["torch_dtype"] == "float16" and cfg["quantization_config"]["quant_method"] == kw["method"]
    layers = [name[: -len(".weight")] for name in dense if QUANTIZED.fullmatch(name)]
    assert len(layers) == 7 * cfg["num_hidden_layers"]
    for name, t in packed.items():  # everything else is stored as it is, in float16
        if not any(name.startswith(p + ".") for p in layers):
            assert t.dtype == torch.float16 and torch.equal(t, dense[name]), name
    for p in layers:
        n, k = dense[p + ".weight"].shape
        t = {s: packed[f"{p}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx") if f"{p}.{s}" in packed}
        if kw["method"] == "awq":
            w = awq_oracle(t["qweight"], t["qzeros"], t["scales"], 4, kw["group_size"])
        else:
            w = gptq_oracle(t, kw["bits"], kw["group_size"], k, n)
        assert torch.equal(w.t(), dense[p + ".weight"]), p


# -- whole model: our logits and greedy tokens against transformers on the dense twin --

# AWQ needs group_size to divide every input width: hidden 96 and intermediate 224 take group_size 32
AWQ_CONFIG = make_config(
    {
        **TINY_TEXT,
        "hidden_size": 96,
        "intermediate_size": 224,
        "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]},
    },
    {**TINY_VISION, "hidden_size": 96},
)
MODELS = {
    "AWQ g32": {"method": "awq", "group_size": 32, "config": AWQ_CONFIG},
    "GPTQ-Int4 g32": {"method": "gptq", "bits": 4, "group_size": 32},
    "GPTQ-Int4 g16 act-order asym, zero biases": {
        "method": "gptq",
        "bits": 4,
        "group_size": 16,
        "desc_act": True,
        "sym": False,
        "zero_biases": True,
    },
    "GPTQ-Int8 g128": {"method": "gptq", "bits": 8, "group_size": 128},
    "GPTQ-Int8 g-1 act-order": {"method": "gptq", "bits": 8, "group_size": -1, "desc_act": True},
}


@pytest.fixture(scope="module", params=list(MODELS))
def quantized_pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    kw = dict(MODELS[request.param])
    write_quantized(d / "q", dense_directory=d / "dense", seed=list(MODELS).index(request.param), **kw)
    return request.param, d / "q", d / "dense"


def test_logits_and_greedy_tokens_match_reference(quantized_pair, hf_model_factory, parity_report):
    name, q, dense = quantized_pair
    model = qwen2vl.load_model(q, dtype=torch.float32, progress=False)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * model.config.text.num_hidden_layers
    ref = hf_model_factory(dense)
    batch = build(CASES["left-padded batch: text / image / video"], seed=7)
    with torch.no_grad():
        a, b = model(**batch), ref(**batch).logits
    keep = batch["attention_mask"].bool()
    parity_report(f"quantized logits, {name}", (a - b)[keep].abs().max().item(), LIMIT)

    batch = build(CASES["one image"], seed=8)
    with torch.no_grad():
        out = ref.generate(
            **batch,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.0,
            top_k=None,
            top_p=None,
            temperature=None,
            pad_token_id=151643,
        )
    steps = list(generate_steps(model, Prompt.from_batch(batch), greedy, 12))
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), out[:, batch["input_ids"].shape[1] :])


def test_padded_mlp_like_the_72b_releases(tmp_path, hf_model_factory, parity_report):
    """intermediate_size 224 in config.json, 200 real: the padding dequantizes to exact zeros and changes nothing."""
    cfg = make_config({**TINY_TEXT, "intermediate_size": 224})
    q = write_quantized(
        tmp_path / "q", "gptq", group_size=32, config=cfg, padded_from=200, dense_directory=tmp_path / "dense", seed=11
    )
    model = qwen2vl.load_model(q, dtype=torch.float32, progress=False)
    mlp = model.model.layers[1].mlp
    assert not mlp.up_proj.dequantize()[200:].any() and not mlp.down_proj.dequantize()[:, 200:].any()
    assert mlp.gate_proj.dequantize()[:200].any()
    batch = build(CASES["one image"], seed=12)
    with torch.no_grad():
        a, b = model(**batch), hf_model_factory(tmp_path / "dense")(**batch).logits
    parity_report("quantized logits, padded MLP", (a - b).abs().max().item(), LIMIT)


def test_cpu_kernels_leave_quantized_layers_alone(tmp_path):
    """dtype=bfloat16 on CPU applies qwen2vl.cpu's transform to the unquantized layers only."""
    q = write_quantized(tmp_path / "q", "gptq", group_size=32, seed=4)
    f32 = qwen2vl.load_model(q, dtype=torch.float32, progress=False)
    bf16 = qwen2vl.load_model(q, dtype=torch.bfloat16, progress=False)
    layer = bf16.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear)
    assert torch.equal(layer.dequantize(), f32.model.layers[0].self_attn.q_proj.dequantize())
    batch = build(CASES["one image"], seed=9)
    with torch.no_grad():
        a, b = f32(**batch), bf16(**batch)
    assert b.dtype == torch.float32 and (a - b).abs().max() / a.abs().max() < 0.05


def test_default_dtype_on_cpu_is_float32(tmp_path):
    q = write_quantized(tmp_path / "q", "gptq", group_size=32)
    model = qwen2vl.load_model(q, progress=False)
    assert model.dtype == torch.float32
    assert model.model.layers[1].mlp.down_proj.scales.dtype == torch.float16


def test_pipeline_load_detects_the_format(tmp_path):
    q = write_quantized(tmp_path / "q", "awq", group_size=8, tokenizer=True)
    pipe = qwen2vl.load(str(q), progress=False)
    assert isinstance(pipe.model.model.layers[0].mlp.up_proj, QuantLinear)
    with pytest.raises(ValueError, match="already quantized"):
        qwen2vl.load_model(q, quantize="int8", progress=False)


# -- refusals: by name, before any weight is read --

REFUSED = {
    "AWQ gemv": ({**awq_config(), "version": "gemv"}, "AWQ version 'gemv'"),
    "AWQ gemv_fast": ({**awq_config(), "version": "gemv_fast"}, "AWQ version 'gemv_fast'"),
    "AWQ exllama": ({**awq_config(), "version": "exllama"}, "AWQ version 'exllama'"),
    "AWQ marlin": ({**awq_config(), "version": "marlin"}, "AWQ version 'marlin'"),
    "AWQ llm-awq": ({**awq_config(), "backend": "llm-awq"}, "AWQ backend 'llm-awq'"),
    "AWQ no zero point": ({**awq_config(), "zero_point": False}, "zero_point=false"),
    "AWQ 8 bits": ({**awq_config(), "bits": 8}, "AWQ bits=8"),
    "GPTQ 2 bits": (gptq_config(bits=2), "GPTQ bits=2"),
    "GPTQ 3 bits": (gptq_config(bits=3), "GPTQ bits=3"),
    "GPTQ v2": ({**gptq_config(), "checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2'"),
    "GPTQ marlin format": ({**gptq_config(), "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    "GPTQ is_marlin_format": ({**gptq_config(), "is_marlin_format": True}, "Marlin"),
    "EXL2": ({"quant_method": "exl2", "bits": 4}, "EXL2"),
    "bitsandbytes": ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes'"),
    "unknown setting": ({**gptq_config(), "act_group_aware": True}, "act_group_aware"),
    "bad group size": (gptq_config(group_size=0), "group_size=0"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_formats_are_refused_by_name(case):
    qcfg, words = REFUSED[case]
    with pytest.raises(QuantizationError, match=words):
        parse_quantization_config(qcfg)


def test_refusal_comes_from_load_model(tmp_path):
    q = write_quantized(tmp_path / "q", "gptq", group_size=32)
    cfg = json.loads((q / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantizationError, match=r"config\.json: GPTQ checkpoint_format 'gptq_v2'"):
        qwen2vl.load_model(q, progress=False)


def _rewrite(q: Path, change) -> None:
    tensors = load_file(q / "model.safetensors")
    change(tensors)
    save_file(tensors, q / "model.safetensors")


@pytest.mark.parametrize(
    "tensor, shape",
    [
        ("model.layers.1.mlp.down_proj.qweight", (24, 72)),
        ("model.layers.0.self_attn.k_proj.scales", (3, 25)),
        ("model.layers.0.self_attn.q_proj.g_idx", (71,)),
    ],
)
def test_shape_mismatch_names_the_tensor(tmp_path, tensor, shape):
    q = write_quantized(tmp_path / "q", "gptq", group_size=32)
    _rewrite(q, lambda t: t.__setitem__(tensor, torch.zeros(shape, dtype=t[tensor].dtype)))
    with pytest.raises(
        QuantizationError, match=rf"{tensor} has shape {tuple(shape)}".replace("(", r"\(").replace(")", r"\)")
    ):
        qwen2vl.load_model(q, progress=False)


def test_wrong_dtype_names_the_tensor(tmp_path):
    q = write_quantized(tmp_path / "q", "awq", group_size=8)
    name = "model.layers.0.mlp.gate_proj.scales"
    _rewrite(q, lambda t: t.__setitem__(name, t[name].float()))
    with pytest.raises(QuantizationError, match=rf"{name} has shape .* dtype F32"):
        qwen2vl.load_model(q, progress=False)


def test_missing_and_stray_tensors(tmp_path):
    q = write_quantized(tmp_path / "q", "gptq", group_size=32)
    _rewrite(
        q,
        lambda t: (
            t.pop("model.layers.1.self_attn.v_proj.qzeros"),
            t.__setitem__("model.layers.1.self_attn.v_proj.wf", torch.zeros(8)),
        ),
    )
    with pytest.raises(qwen2vl.CheckpointError, match=r"v_proj\.qzeros.*unused.*v_proj\.wf"):
        qwen2vl.load_model(q, progress=False)


def test_nonzero_bias_on_a_biasless_layer_is_refused(tmp_path):
    q = write_quantized(tmp_path / "q", "gptq", group_size=32, zero_biases=True)
    _rewrite(q, lambda t: t["model.layers.0.mlp.down_proj.bias"].fill_(0.5))
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.down_proj\.bias is not zero"):
        qwen2vl.load_model(q, progress=False)


def test_quantized_vision_layer_is_refused(tmp_path):
    q = write_quantized(tmp_path / "q", "gptq", group_size=32)
    _rewrite(q, lambda t: t.__setitem__("visual.blocks.0.attn.qkv.qweight", torch.zeros(8, 180, dtype=torch.int32)))
    with pytest.raises(QuantizationError, match=r"visual\.blocks\.0\.attn\.qkv\.qweight: .*only the decoder"):
        qwen2vl.load_model(q, progress=False)


def test_quantized_tensors_without_quantization_config(tmp_path):
    q = write_quantized(tmp_path / "q", "awq", group_size=8)
    cfg = json.loads((q / "config.json").read_text())
    del cfg["quantization_config"]
    (q / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qwen2vl.CheckpointError, match=r"\.qweight is a quantized tensor, but config\.json has no"):
        qwen2vl.load_model(q, progress=False)


def test_transformers_key_layout(tmp_path):
    """model.language_model.* / model.visual.* names (transformers >= 4.52 saves) load the same layers."""
    q = write_quantized(tmp_path / "q", "gptq", group_size=32, desc_act=True)
    before = qwen2vl.load_model(q, dtype=torch.float32, progress=False)
    tensors = load_file(q / "model.safetensors")
    renamed = {
        (
            "model.language_model." + k[len("model.") :]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): t
        for k, t in tensors.items()
    }
    assert any(k.startswith("model.language_model.layers.0.self_attn.q_proj.qweight") for k in renamed)
    save_file(renamed, q / "model.safetensors")
    after = qwen2vl.load_model(q, dtype=torch.float32, progress=False)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_unequal_act_order_groups_are_refused():
    gen = torch.Generator().manual_seed(0)
    k, n = 32, 8
    g_idx = torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)[torch.randperm(k, generator=gen)]
    t = {
        "qweight": random_bits((k // 8, n), gen),
        "qzeros": random_bits((2, 1), gen),
        "scales": torch.ones(2, n, dtype=torch.float16),
        "g_idx": g_idx,
    }
    with pytest.raises(QuantizationError, match="unequal sizes"):
        read_layer("x", t, QuantScheme("gptq", 4, 16), k, n)


# -- memory: read straight into the final layout --

MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[3])
from test_server_hostile import RssPeak
import qwen2vl
qwen2vl.load_model(sys.argv[2], progress=False)  # warm-up: torch's one-time initialisation is not the loader's
with RssPeak() as rss:
    model = qwen2vl.load_model(sys.argv[1], progress=False)
size = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
print(json.dumps({"grew": rss.grew, "weights": size}))
"""


@pytest.mark.heavy  # loads in a subprocess to read its peak RSS
def test_load_peak_is_weights_plus_a_bounded_working_set(tmp_path):
    """16 GPTQ-Int4 layers of width 1024 / 4096 (random packed bits; the numbers do not matter here): the peak
    over the loaded weights stays under 64 MB, half the checkpoint's packed tensors (a second copy would be all).
    Measured: weights 139.6 MB, peak growth 183-189 MB (packed tensors 127 MB)."""
    import subprocess
    import sys

    from qwen2vl.testing.quantized import write_random_packed

    text = {
        "vocab_size": 1024,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    }
    cfg = make_config(text, {**TINY_VISION, "hidden_size": 1024})
    q, packed_bytes = write_random_packed(tmp_path / "big", cfg, gptq_config())
    small = write_quantized(tmp_path / "small", "gptq", group_size=32)
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(q), str(small), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    over = m["grew"] - m["weights"]
    print(
        f"weights {m['weights'] / 1e6:.1f} MB, peak growth {m['grew'] / 1e6:.1f} MB, packed {packed_bytes / 1e6:.1f} MB"
    )
    assert packed_bytes > 120e6 and over < min(64e6, packed_bytes / 2), m


# -- CUDA: torch's fused int4 kernel --


def test_int4_kernel_scales_and_zeros_on_cpu():
    """The [s, (8 - z) * s] table the CUDA path hands to tinygemm, checked with torch's CPU twin of that kernel."""
    from qwen2vl.quant.linear import int4pack_scales_and_zeros

    gen = torch.Generator().manual_seed(2)
    k, n, g = 128, 32, 32
    t = {
        "qweight": random_bits((k // 8, n), gen),
        "qzeros": random_bits((k // g, n // 8), gen),
        "scales": (torch.rand(k // g, n, generator=gen) * 0.05).half(),
        "g_idx": (torch.arange(k) // g).int(),
    }
    storage = read_layer("x", t, QuantScheme("gptq", 4, g), k, n)
    layer = QuantLinear(k, n, 4, g, bias=False)
    layer.load_state_dict(QuantLinear.state_from(storage), assign=True)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.unpacked().int(), 2)
    table = int4pack_scales_and_zeros(layer.scales, layer.zeros, torch.float32)
    x = torch.randn(5, k, generator=gen)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, table)
    # the kernel forms (q - 8) * s + (8 - z) * s in float32, without the reference's rounding to float16
    z, scale = layer.zeros.float().repeat_interleave(g, 1), layer.scales.float().repeat_interleave(g, 1)
    w = (layer.unpacked().float() - z) * scale
    torch.testing.assert_close(y, x @ w.t(), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_int4_matches_reference(tmp_path, hf_model_factory):
    """GPTQ-Int4 on CUDA in bfloat16 through `_weight_int4pack_mm`: each layer against its own dequantized weight,
    and the logits against transformers float32 on the dense twin, within bfloat16's reach."""
    q = write_quantized(
        tmp_path / "q",
        "gptq",
        group_size=32,
        config=AWQ_CONFIG,  # widths 96 / 224: fused fits
        dense_directory=tmp_path / "dense",
        seed=13,
    )
    model = qwen2vl.load_model(q, dtype=torch.bfloat16, device="cuda", progress=False)
    gen = torch.Generator(device="cuda").manual_seed(14)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            x = torch.randn(7, layer.in_features, device="cuda", generator=gen).bfloat16()
            assert layer._fused_cuda_fits(x), name
            expected = x.float() @ layer.dequantize().float().t()
            expected += 0 if layer.bias is None else layer.bias.float()
            got = layer(x).float()
            assert "_int4pack" in layer.__dict__, name
            assert (got - expected).abs().max() <= 0.02 * expected.abs().max(), name
    batch = build(CASES["one image"], seed=14)
    with torch.no_grad():
        a = model(**{k: v.cuda() for k, v in batch.items()}).float().cpu()
        b = hf_model_factory(tmp_path / "dense")(**batch).logits
    assert (a - b).abs().max() / b.abs().max() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


def test_4bit_decode_products_under_bf16_drift_no_more_than_the_reference_in_bf16(
    tmp_path, hf_model_factory, parity_report
):
    """Under bf16 products a decode step's 4-bit layers take x rounded to int16 (kernels.Q4Product inputs="int16",
    where the kernels have the integer product; else bf16 pairs, or the exact float32 product): measured against
    transformers float32 on the dense twin, the logits may drift no more than transformers' own run in bf16 on the
    same inputs (the worst of several). Rounding x to int8 instead (as llama.cpp's 4-bit types do) measured 1.0-1.44
    here, which is why the product splits a 16-bit x into two bytes."""
    from qwen2vl import kernels

    # widths that are multiples of 128, as the real models' are (the integer product's step)
    text = {**TINY_TEXT, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4}
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [8, 4, 4]}
    config = make_config(text, {**TINY_VISION, "hidden_size": 128})
    q = write_quantized(tmp_path / "q", "awq", config=config, seed=3, dense_directory=tmp_path / "dense")
    ours = qwen2vl.load_model(q, dtype=torch.bfloat16, progress=False, cpu_matmul="bf16")
    if kernels.available():
        kinds = {m._cpu_product().kind for m in ours.modules() if isinstance(m, QuantLinear)}
        pairs = "4-bit bf16 pairs" if kernels.native_bf16_inputs() else "4-bit"
        assert kinds == {"4-bit int16 inputs" if kernels.int16_q4_inputs() else pairs}
    ref32 = hf_model_factory(tmp_path / "dense", dtype=torch.float32, attn="sdpa")
    ref16 = hf_model_factory(tmp_path / "dense", dtype=torch.bfloat16, attn="sdpa")
    ratios = []
    # rows few enough (<= kernels.MAX_ROWS) to run as a decode step's products: 48 one-token rows take them in every
    # projection, as a decode step does; 2 x 24 in attention's (a prompt's MLP computes in bf16 under bf16 products)
    for seed, shape in enumerate([(48, 1), (48, 1), (2, 24), (2, 24)]):
        ids = torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(seed))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            want = ref32(**batch).logits
            theirs = (ref16(**batch).logits.float() - want).abs().max().item()
            mine = (ours(**batch) - want).abs().max().item()
        print(f"{shape}: max |logit - reference float32|: ours {mine:.3g}, reference in bf16 {theirs:.3g}")
        ratios.append(mine / theirs)
    parity_report("4-bit decode products under bf16: our drift / the reference's bf16 drift (worst)", max(ratios), 1.0)
