"""Tensor parallelism (qwen2vl.parallel) on CPU with Gloo: 2 and 3 ranks against the single-process model.

Each multi-process test spawns the ranks once and runs every case inside them: the logits of a whole prompt
(float32) within 1e-5 of the single-process model's (relative to the largest logit), bit-identical on every rank
(so every rank chooses the same tokens), greedy tokens identical, the KV cache holding only the rank's heads, and
only the rank's share of the decoder's weights in memory. Checkpoints: odd widths, GQA with the KV heads split
(2 ranks) and replicated (3 ranks over 1 KV head), tied and untied output, sharded files in both key layouts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

from model_inputs import CASES, build
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.generate.decode import Prompt, generate_steps, greedy
from qwen2vl.model import KVCache
from qwen2vl.parallel import (
    TensorParallelError,
    check_world_size,
    load_rank_model,
    run_ranks,
    shard_decoder,
    share,
)
from qwen2vl.testing.checkpoint import TINY_TEXT, TINY_VISION, make_config, write_checkpoint
from qwen2vl.weights import TensorSlice, _read_tensor, load_model, read_header

TP_CASES = [
    "one image",
    "video with T > spatial, then text",
    "image then video then image",
    "left-padded batch: text / image / video",
]
NEW_TOKENS = 5


def _rank_check(rank: int, world: int, device: str, jobs: list, out: str) -> None:
    """Runs in every rank; rank 0 also runs the single-process model. For each (label, checkpoint, load options)
    job, writes what the rank found."""
    found: dict = {}
    for label, ckpt, options in jobs:
        found[label] = _check_one(rank, ckpt, {**options, "device": device})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(found, f)


def _check_one(rank: int, ckpt: str, options: dict) -> dict:
    from qwen2vl import kernels

    torch.manual_seed(0)
    options = {"dtype": torch.float32, "progress": False, **options}
    kernels.use(options.pop("kernels", None))
    split_vision = options.pop("shard_vision", False)
    ref = load_model(ckpt, **options) if rank == 0 else None
    options.pop("progress")
    model = load_rank_model(ckpt, **options, shard_vision=split_vision)
    cfg = model.config.text

    def held(m: torch.nn.Module) -> int:  # the base weights: parameters and buffers (quantized layers keep their
        # packed weights as buffers), not an adapter's (whose A of a column-parallel layer every rank holds whole)
        tensors = [t for name, t in (*m.named_parameters(), *m.named_buffers()) if "lora_" not in name]
        return sum(t.numel() * t.element_size() for t in tensors)

    found: dict = {"kv_cache_heads": KVCache(cfg, 1, 4, torch.float32).k.shape[2], "cases": {}}
    found.update(decoder_bytes=held(model.model.layers), vision_bytes=held(model.visual.blocks))
    if ref is not None:
        found.update(decoder_bytes_full=held(ref.model.layers), vision_bytes_full=held(ref.visual.blocks))
    with torch.inference_mode():
        if split_vision:  # the piecewise encode (the server's) too: blocks in row and head ranges
            batch = build([[("image", (1, 32, 24))]], seed=1)
            pieces = model.encode_vision_pieces(batch["pixel_values"], batch["image_grid_thw"], 2e5)
            while True:
                try:
                    next(pieces)
                except StopIteration as done:
                    feats = done.value
                    break
            if ref is not None:
                want = ref.encode_vision(batch["pixel_values"], batch["image_grid_thw"])
                found["pieces_diff"] = ((feats - want).abs().max() / want.abs().max()).item()
        for name in TP_CASES:
            batch = {k: v.to(model.device) for k, v in build(CASES[name], seed=len(name)).items()}
            logits = model(**batch)
            top, bottom = logits.clone(), logits.clone()  # the same on every rank: the max over ranks is the min
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            dist.all_reduce(bottom, op=dist.ReduceOp.MIN)
            steps = generate_steps(model, Prompt.from_batch(batch), greedy, NEW_TOKENS)
            c = found["cases"][name] = {
                "ranks_differ": (top - bottom).abs().max().item(),
                "tokens": torch.stack([s.tokens for s in steps], 1).tolist(),
            }
            if ref is not None:
                want = ref(**batch)
                steps = generate_steps(ref, Prompt.from_batch(batch), greedy, NEW_TOKENS)
                c.update(
                    max_diff=(logits - want).abs().max().item(),
                    scale=want.abs().max().item(),
                    tokens_single=torch.stack([s.tokens for s in steps], 1).tolist(),
                )
    return found


def _run(tmp_path, jobs: list, world: int, device: str = "cpu") -> list[dict]:
    """jobs: (label, checkpoint, load options); all run in one start of the ranks (on CUDA: rank r on cuda:r)."""
    jobs = [(label, str(c), o) for label, c, o in jobs]
    run_ranks(_rank_check, world, (jobs, str(tmp_path)), device=device, timeout_s=300)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def _check(found: list[dict], world: int, kv_heads: int, parity_report, label: str) -> None:
    single = found[0]
    # each rank holds 1/world of the decoder's projections (norms and replicated KV heads besides)
    assert all(f["decoder_bytes"] < single["decoder_bytes_full"] / world * 1.1 for f in found), label
    for name, c in single["cases"].items():
        # 1e-5 of the logits' scale (float32's spacing is 4e-6 at the tied checkpoint's logits of ~40)
        parity_report(f"tp {label}: {name} max |diff| / max |logit|", c["max_diff"] / c["scale"], 1e-5)
        assert c["scale"] > 1.0  # logits that move: the comparison means something
        assert c["tokens"] == c["tokens_single"], name
        assert len(c["tokens"][0]) == NEW_TOKENS
    for f in found:
        assert f["kv_cache_heads"] == kv_heads
        for name, c in f["cases"].items():
            assert c["ranks_differ"] == 0.0, f"{name}: the ranks' logits differ"
            assert c["tokens"] == single["cases"][name]["tokens_single"], name


def _adapter(ckpt, directory, vision: bool) -> str:
    """A random LoRA adapter (PEFT's format) on every decoder projection, and the vision blocks when asked."""
    from qwen2vl.lora import LoRAConfig, apply_lora, lora_modules, save_adapter

    model = load_model(ckpt, dtype=torch.float32, progress=False, cpu_kernels=False)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, vision=vision), seed=0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in lora_modules(model).values():  # B no longer zero: the adapter changes the logits
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) / m.lora_A.in_features**0.5)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)
    return str(save_adapter(model, directory))


def test_two_ranks_split_kv_heads(tmp_path, parity_report):
    # 6 query heads, 2 KV heads: one KV head (3 query heads) per rank; untied output, new key layout, 3 files;
    # and with a LoRA adapter on every decoder projection and vision layer (each rank its share of A or B)
    ckpt = write_checkpoint(
        tmp_path / "ckpt", make_config(), tokenizer=False, key_layout="transformers", shards=3, seed=3
    )
    adapter = _adapter(ckpt, tmp_path / "ad", vision=True)
    found = _run(tmp_path, [("float32", ckpt, {}), ("adapter", ckpt, {"adapter": adapter})], 2)
    for label in ("float32", "adapter"):
        _check([f[label] for f in found], 2, 1, parity_report, f"2 ranks {label}")


def test_three_ranks_replicate_kv_head(tmp_path, parity_report):
    # 1 KV head for 6 query heads over 3 ranks: the KV head is replicated; odd MLP width 201; tied output
    text = {**TINY_TEXT, "num_key_value_heads": 1, "intermediate_size": 201}
    ckpt = write_checkpoint(tmp_path / "ckpt", make_config(text, tie_word_embeddings=True), tokenizer=False, seed=4)
    found = _run(tmp_path, [("float32", ckpt, {})], 3)
    _check([f["float32"] for f in found], 3, 1, parity_report, "3 ranks")


# widths whose shares cut the quantized formats only between packed words and groups of 16 (2 ranks: 3 query
# heads of 16, 1 KV head, 128 MLP columns; 3 ranks: 2 query heads, the 1 KV head replicated, 80 MLP columns)
QUANT_TEXT = {**TINY_TEXT, "hidden_size": 96, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
QUANT_VISION = {**TINY_VISION, "hidden_size": 96}


# 6 vision heads (of 12), MLP 180: the vision tower splits over 2 and 3 ranks
SPLIT_VISION = {**TINY_VISION, "embed_dim": 72, "num_heads": 6}


@pytest.mark.parametrize("world", [2, 3])
def test_vision_tower_split_over_ranks(tmp_path, parity_report, world):
    """shard_vision: each rank holds 1/world of every vision block (its heads of q, k and v, of proj's inputs,
    of the MLP), the logits stay the single process's (float32, and bf16 weights through the CPU kernels, whose
    replaced layers keep the all-reduces), and so does the piecewise encode the server runs."""
    text = {**TINY_TEXT, "num_key_value_heads": 1, "intermediate_size": 240}
    ckpt = write_checkpoint(tmp_path / "c", make_config(text, SPLIT_VISION), tokenizer=False, seed=7)
    config = make_config(text, SPLIT_VISION)
    bf16 = write_checkpoint(tmp_path / "b", config, tokenizer=False, seed=8, dtype=torch.bfloat16)
    jobs = [
        ("float32", ckpt, {"shard_vision": True}),
        ("bf16 kernels", bf16, {"dtype": torch.bfloat16, "cpu_matmul": "float32", "shard_vision": True}),
        ("adapter", ckpt, {"shard_vision": True, "adapter": _adapter(ckpt, tmp_path / "ad", vision=False)}),
    ]
    found = _run(tmp_path, jobs, world)
    for label, *_ in jobs:
        ranks = [f[label] for f in found]
        _check(ranks, world, 1, parity_report, f"{world} ranks, split vision, {label}")
        assert all(f["vision_bytes"] < ranks[0]["vision_bytes_full"] / world * 1.15 for f in ranks)  # + norms
        parity_report(f"tp {world} ranks split vision {label}: piecewise encode", ranks[0]["pieces_diff"], 1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallelism needs 2 CUDA devices")
def test_two_ranks_on_cuda_with_nccl(tmp_path, parity_report):
    """The same parity on GPUs: NCCL all-reduces, rank r on cuda:r, the vision tower split too."""
    text = {**TINY_TEXT, "num_key_value_heads": 1, "intermediate_size": 240}
    ckpt = write_checkpoint(tmp_path / "c", make_config(text, SPLIT_VISION), tokenizer=False, seed=7)
    found = _run(tmp_path, [("cuda", ckpt, {}), ("cuda split vision", ckpt, {"shard_vision": True})], 2, "cuda")
    for label in ("cuda", "cuda split vision"):
        _check([f[label] for f in found], 2, 1, parity_report, f"2 ranks {label}")


@pytest.mark.parametrize("world,kv,mlp", [(2, 2, 256), (3, 1, 240)])
def test_awq_and_gptq_checkpoints_on_ranks(tmp_path, parity_report, world, kv, mlp):
    """AWQ, GPTQ 4-bit (with the zero biases older revisions carry) and GPTQ 8-bit, group size 16: each rank
    reads its share of the packed tensors and gets the single process's logits (float32)."""
    from qwen2vl.testing.quantized import write_quantized

    config = make_config({**QUANT_TEXT, "num_key_value_heads": kv, "intermediate_size": mlp}, QUANT_VISION)
    jobs = [
        ("awq", write_quantized(tmp_path / "awq", "awq", group_size=16, config=config, seed=5), {}),
        ("gptq4", write_quantized(tmp_path / "g4", "gptq", group_size=16, config=config, zero_biases=True), {}),
        ("gptq8", write_quantized(tmp_path / "g8", "gptq", bits=8, group_size=16, config=config, seed=6), {}),
    ]
    found = _run(tmp_path, jobs, world)
    for label, *_ in jobs:
        _check([f[label] for f in found], world, 1, parity_report, f"{world} ranks {label}")


def test_quantize_int8_and_int4_on_ranks_equal_one_process(tmp_path, parity_report):
    """--quantize on 2 ranks quantizes each rank's share to the weights one process would have (int8: each
    row-parallel row scaled by its largest |w| over both ranks; int4: whole groups of 128 per rank), so the logits
    are the single process's: float32 products through the PyTorch path. (The int8 kernel rounds its input to
    int16 per group of 128 before the product, a step of 3e-5 of the group's largest input, which turns the
    all-reduce's last-bit differences into differences of that size; the kernels have their own tests against
    the PyTorch path.)"""
    text = {
        **TINY_TEXT,
        "hidden_size": 256,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    }
    ckpt = write_checkpoint(tmp_path / "c", make_config(text, {**TINY_VISION, "hidden_size": 256}), tokenizer=False)
    options = {"dtype": torch.bfloat16, "cpu_matmul": "float32", "kernels": "off"}
    jobs = [(q, ckpt, {**options, "quantize": q}) for q in ("int8", "int4")]
    found = _run(tmp_path, jobs, 2)
    for label, *_ in jobs:
        _check([f[label] for f in found], 2, 1, parity_report, f"2 ranks --quantize {label}")


def test_refused_world_size_names_sizes_that_work():
    cfg = Qwen2VLConfig.from_hf_dict(make_config())  # 6 heads, 2 KV heads, MLP 200
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 .* sizes that work: \[1, 2\]"):
        check_world_size(cfg.text, 3)
    with pytest.raises(ValueError, match=r"sizes that work: \[1, 2\]"):
        check_world_size(cfg.text, 4)  # would replicate the 2 KV heads, but 6 query heads do not split in 4
    check_world_size(cfg.text, 2)


def test_split_vision_refusals_name_what_works(tiny_bf16, tmp_path):
    import qwen2vl
    from qwen2vl.parallel import check_vision_world_size

    cfg = Qwen2VLConfig.from_hf_dict(make_config())  # 3 vision heads, MLP 150
    with pytest.raises(ValueError, match=r"does not split the vision tower: 3 heads .* sizes that work: \[1, 3\]"):
        check_vision_world_size(cfg.vision, 2)
    check_vision_world_size(cfg.vision, 3)
    with pytest.raises(ValueError, match="shard_vision .* needs tensor_parallel_size > 1"):
        qwen2vl.load(str(tiny_bf16), shard_vision=True, progress=False)
    # LoRA on a vision layer split by inputs: its output is reduced inside the layer, before the LoRA term
    from qwen2vl.lora import AdapterError
    from qwen2vl.parallel import shard_vision

    ckpt = write_checkpoint(tmp_path / "c", make_config(None, SPLIT_VISION), tokenizer=False)
    adapter = _adapter(ckpt, tmp_path / "ad", vision=True)
    with pytest.raises(AdapterError, match=r"visual.blocks.0.attn.proj carries LoRA, but with the vision tower split"):
        load_model(ckpt, adapter=adapter, shard=lambda m: shard_vision(m, 0, 2), progress=False)


@pytest.mark.parametrize("heads,kv,world", [(6, 2, 2), (6, 1, 3), (12, 2, 4), (12, 4, 2), (12, 2, 6), (8, 8, 4)])
def test_share_kv_head_serves_the_ranks_query_heads(heads, kv, world):
    cfg = Qwen2VLConfig.from_hf_dict(
        make_config(
            {
                **TINY_TEXT,
                "hidden_size": heads * 12,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "intermediate_size": 24 * world,
            },
            {**TINY_VISION, "hidden_size": heads * 12},
        )
    )
    groups = heads // kv
    owned_q, owned_kv = [], []
    for rank in range(world):
        s = share(cfg.text, rank, world)
        owned_q += range(s.q0, s.q0 + s.q)
        owned_kv += range(s.kv0, s.kv0 + s.kv)
        # every query head of the rank attends with a KV head the rank holds, at the same local group index
        for local, head in enumerate(range(s.q0, s.q0 + s.q)):
            assert head // groups == s.kv0 + local // (s.q // s.kv)
    assert owned_q == list(range(heads))
    assert sorted(set(owned_kv)) == list(range(kv))
    assert len(owned_kv) == max(kv, world)


@pytest.mark.parametrize("shape,dim", [((7, 5), 0), ((7, 5), 1), ((3, 6, 4), 1), ((3, 6, 4), 2), ((9,), 0)])
def test_sliced_read_equals_slice_of_full_read(tmp_path, shape, dim):
    from safetensors.torch import save_file

    for dtype in (torch.float32, torch.bfloat16):
        t = torch.randn(shape).to(dtype)
        path = tmp_path / "t.safetensors"
        save_file({"x": t, "y": torch.ones(2)}, path)
        header, start = read_header(path)
        n = shape[dim]
        for lo, hi in ((0, n), (1, n - 1), (n - 2, n)):
            with open(path, "rb") as f:
                got = _read_tensor(f, path, header["x"], start, TensorSlice(dim, lo, hi, n))
            assert torch.equal(got, t.narrow(dim, lo, hi - lo))
    with open(path, "rb") as f, pytest.raises(ValueError, match="slice of dimension"):
        _read_tensor(f, path, header["x"], start, TensorSlice(dim, 0, 1, n + 1))


def _barrier_after_death(rank: int, world: int, device: str) -> None:
    if rank == 1:
        os._exit(3)
    dist.barrier()


def _raises_on_rank_one(rank: int, world: int, device: str) -> None:
    if rank == 1:
        raise ValueError("weights not found on this host")
    dist.barrier()


def _hangs_on_rank_one(rank: int, world: int, device: str) -> None:
    if rank == 1:
        import time

        time.sleep(120)
    dist.barrier()


def test_a_hung_rank_times_out_instead_of_hanging():
    import time

    t = time.perf_counter()
    with pytest.raises(TensorParallelError, match=r"rank 0 of 2 failed: .*(timed out|Timed out|timeout)"):
        run_ranks(_hangs_on_rank_one, 2, timeout_s=3)
    assert time.perf_counter() - t < 60  # the collective timeout, the grace period, process start: not 120 s


def test_a_rank_that_dies_or_fails_is_a_clear_error_not_a_hang():
    with pytest.raises(TensorParallelError, match=r"rank 1 of 2 died \(exit code 3"):
        run_ranks(_barrier_after_death, 2, timeout_s=20)
    with pytest.raises(TensorParallelError, match="rank 1 of 2 failed: ValueError: weights not found on this host"):
        run_ranks(_raises_on_rank_one, 2, timeout_s=20)


def _share(rank: int, world: int):
    return lambda model: shard_decoder(model, rank, world)


def test_shares_that_cut_a_quantized_format_are_refused_before_reading(tmp_path):
    from qwen2vl.quant import QuantizationError
    from qwen2vl.testing.quantized import write_quantized

    # the default tiny widths: o_proj's 72 inputs -> 36 per rank, down_proj's 200 -> 100: not whole groups of 8
    ckpt = write_quantized(tmp_path / "awq", "awq", group_size=8, config=make_config())
    with pytest.raises(QuantizationError, match=r"share of inputs (36..72 of 72|100..200 of 200) does not start"):
        load_model(ckpt, shard=_share(1, 2), progress=False)
    # act-order: a share of the inputs would need groups it does not hold
    config = make_config({**QUANT_TEXT, "intermediate_size": 256}, QUANT_VISION)
    ckpt = write_quantized(tmp_path / "act", "gptq", group_size=16, desc_act=True, config=config)
    with pytest.raises(QuantizationError, match="act-order .* cannot be split by input across tensor-parallel ranks"):
        load_model(ckpt, shard=_share(0, 2), progress=False)
    # --quantize int4 quantizes whole groups of 128: 100 inputs per rank are not
    ckpt = write_checkpoint(tmp_path / "c", make_config(), tokenizer=False)
    with pytest.raises(ValueError, match=r"quantize='int4' under tensor parallelism .* inputs 0..36 of 72"):
        load_model(ckpt, quantize="int4", shard=_share(0, 2), progress=False)


@pytest.mark.parametrize(
    "method,bits,part,cuts",
    [
        # output rows 16..32 of 64: AWQ packs 8 rows a word in qweight and qzeros, GPTQ packs only qzeros (8 or 4)
        ("awq", 4, TensorSlice(0, 16, 32, 64), {"qweight": (1, 2, 4), "qzeros": (1, 2, 4), "scales": (1, 16, 32)}),
        ("gptq", 4, TensorSlice(0, 16, 32, 64), {"qweight": (1, 16, 32), "qzeros": (1, 2, 4), "scales": (1, 16, 32)}),
        ("gptq", 8, TensorSlice(0, 16, 32, 64), {"qweight": (1, 16, 32), "qzeros": (1, 4, 8), "scales": (1, 16, 32)}),
        # inputs 32..64 of 96, groups of 16: groups 2..4; GPTQ packs 8 (4-bit) or 4 (8-bit) inputs a word
        ("awq", 4, TensorSlice(1, 32, 64, 96), {"qweight": (0, 32, 64), "qzeros": (0, 2, 4), "scales": (0, 2, 4)}),
        ("gptq", 4, TensorSlice(1, 32, 64, 96), {"qweight": (0, 4, 8), "g_idx": (0, 32, 64), "scales": (0, 2, 4)}),
        ("gptq", 8, TensorSlice(1, 32, 64, 96), {"qweight": (0, 8, 16), "g_idx": (0, 32, 64), "qzeros": (0, 2, 4)}),
    ],
)
def test_packed_slices_cut_whole_words_and_groups(method, bits, part, cuts):
    from qwen2vl.quant import QuantizationError, QuantScheme, packed_slices

    scheme = QuantScheme(method, bits, 16)
    k, n = (96, 64)
    slices, first_group = packed_slices("layer", scheme, k, n, part)
    for suffix, (dim, start, stop) in cuts.items():
        got = slices[suffix]
        assert (got.dim, got.start, got.stop) == (dim, start, stop), suffix
    assert first_group == (part.start // 16 if part.dim == 1 else 0)
    off_by = TensorSlice(part.dim, part.start + 2, part.stop, part.full)  # inside a packed word or a group
    with pytest.raises(QuantizationError, match="this tensor_parallel_size does not split this checkpoint"):
        packed_slices("layer", scheme, k, n, off_by)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """`qwen2vl make-tiny`'s checkpoint: bf16, so the CPU kernels run on each rank's shards too."""
    from qwen2vl.cli import main

    directory = tmp_path_factory.mktemp("tp-cli") / "tiny"
    assert main(["make-tiny", str(directory)]) == 0
    return directory


def test_cli_run_on_two_ranks_prints_what_one_process_prints(tiny_bf16, capfd):
    from qwen2vl.cli import main

    argv = ["run", "--model", str(tiny_bf16), "--prompt", "Hi", "--max-new-tokens", "8"]
    assert main(argv) == 0
    one = capfd.readouterr().out
    assert main(argv + ["--tensor-parallel-size", "2"]) == 0
    two = capfd.readouterr().out
    assert two == one and len(one.strip()) > 0  # printed once (rank 0 only), the same greedy answer


def test_cli_refuses_a_world_size_that_does_not_split_before_loading(tiny_bf16, capfd):
    from qwen2vl.cli import main

    assert main(["run", "--model", str(tiny_bf16), "--prompt", "Hi", "--tensor-parallel-size", "4"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sizes that work: [1, 2]" in err[0]


def test_load_with_tensor_parallel_size_needs_a_process_group(tiny_bf16):
    import qwen2vl

    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        qwen2vl.load(str(tiny_bf16), tensor_parallel_size=2, progress=False)


def test_torchrun_ranks_run_the_same_command(tiny_bf16, capfd):
    """`torchrun --nproc-per-node 2 -m qwen2vl run --tensor-parallel-size 2`: each process is one rank (the way
    across hosts); rank 0 prints what one process prints."""
    import subprocess
    import sys

    from qwen2vl.cli import main

    argv = ["run", "--model", str(tiny_bf16), "--prompt", "Hi", "--max-new-tokens", "8"]
    assert main(argv) == 0
    one = capfd.readouterr().out
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "qwen2vl",
            *argv,
            "--tensor-parallel-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == one


def test_cli_chat_on_two_ranks_prints_what_one_process_prints(tiny_bf16, capfd, monkeypatch):
    """Rank 0 (this process) reads the lines and hands each to the other rank; the answers, a /reset and an
    attached image included, are what one process prints."""
    import io

    from processing_fixtures import noise_image
    from qwen2vl.cli import main

    picture = tiny_bf16.parent / "chat.png"
    noise_image(60, 45, seed=2).save(picture)
    lines = f"Hi\n/image {picture}\nWhat is this?\n/reset\nAgain\n"
    argv = ["chat", "--model", str(tiny_bf16), "--max-new-tokens", "6"]
    printed = []
    for extra in ([], ["--tensor-parallel-size", "2"]):
        monkeypatch.setattr("sys.stdin", io.StringIO(lines))
        assert main(argv + extra) == 0
        printed.append(capfd.readouterr().out)
    assert printed[1] == printed[0] and len(printed[0].strip().splitlines()) == 3


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _serve(argv: list[str], launcher: tuple[str, ...] = ()):
    """`python -m [LAUNCHER -m] qwen2vl serve ARGV` on a free port; returns (process, base URL) once it answers
    /health."""
    import subprocess
    import sys
    import time

    import httpx

    from qwen2vl.parallel import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", *launcher, "qwen2vl", "serve", *argv, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as in a terminal: a background job of a shell without job control inherits SIGINT ignored, and
        # then uvicorn's re-raise of the signal after its shutdown does nothing (exit 0, not 130)
        preexec_fn=_default_sigint,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the tensor-parallel server did not start")


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


SERVE_FLAGS = [
    "--served-model-name",
    "m",
    "--dtype",
    "float32",
    "--kv-cache-memory",
    "64MiB",
    "--max-model-len",
    "1024",
    "--prefill-chunk",
    "16",
]


def test_server_on_two_ranks_answers_what_one_process_answers(tmp_path):
    """Continuous batching on 2 ranks: requests of different lengths, with and without a picture, streamed or
    not, sent at once (prefill chunks of 16 tokens interleave with other requests' decode steps), and one
    streaming client that leaves early: every answer's tokens equal the single-process server's and each
    token's logprob and alternatives agree within 1e-4. The vision tower is split too (--shard-vision): rank 0's
    engine hands each vision encode's pieces to rank 1 as well; and two of the requests name a LoRA adapter
    served beside the model (--lora-modules), each rank holding its share of it."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from qwen2vl.serve.config import ServerConfig
    from qwen2vl.serve.server import build_server, serve_in_thread
    from test_server import data_uri

    def body(content, max_tokens, stream=False, model="m"):
        return {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
            "stream": stream,
        }

    picture = [{"type": "image_url", "image_url": {"url": data_uri(90, 70, seed=4)}}]
    bodies = [
        body("Hi", 9),
        body(picture + [{"type": "text", "text": "Describe it."}], 7),
        body("Tell me a long story about a cat, a dog and a bird in a small town. " * 3, 11),
        body(picture + [{"type": "text", "text": "And this?"}], 8, stream=True),
        body("One more", 5),
        body("One more", 5, model="tuned"),  # a LoRA adapter served beside the model, in the same batches
        body(picture + [{"type": "text", "text": "Describe it."}], 6, stream=True, model="tuned"),
    ]

    def ask(base: str, b: dict) -> list:
        """(token text, logprob, {alternative: logprob}) per token."""
        if not b["stream"]:
            r = httpx.post(base + "/v1/chat/completions", json=b, timeout=120)
            assert r.status_code == 200, r.text
            items = r.json()["choices"][0]["logprobs"]["content"]
        else:
            items = []
            with httpx.stream("POST", base + "/v1/chat/completions", json=b, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        lp = json.loads(line[6:])["choices"][0].get("logprobs")
                        items += lp["content"] if lp else []
        return [(t["token"], t["logprob"], {a["token"]: a["logprob"] for a in t["top_logprobs"]}) for t in items]

    def leave_early(base: str) -> None:
        with httpx.stream("POST", base + "/v1/chat/completions", json=body("Bye " * 30, 200, True), timeout=120) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break

    tiny_ckpt = write_checkpoint(tmp_path / "c", make_config(None, SPLIT_VISION), seed=9)
    adapter = _adapter(tiny_ckpt, tmp_path / "ad", vision=False)
    single = build_server(
        ServerConfig(
            model=str(tiny_ckpt),
            served_model_name="m",
            dtype="float32",
            kv_cache_memory="64MiB",
            max_model_len=1024,
            prefill_chunk=16,
            lora_modules=(("tuned", adapter),),
        )
    )
    uv, single_base = serve_in_thread(single)
    flags = ["--tensor-parallel-size", "2", "--shard-vision", "--lora-modules", f"tuned={adapter}", *SERVE_FLAGS]
    proc, base = _serve(["--model", str(tiny_ckpt), *flags])
    try:
        answers = {}
        for where in (single_base, base):
            with ThreadPoolExecutor(len(bodies) + 1) as pool:
                gone = pool.submit(leave_early, where)
                answers[where] = list(pool.map(ask, [where] * len(bodies), bodies))
                gone.result()
            answers[where].append(ask(where, bodies[0]))  # after the early leaver: its slot and the ranks are fine
        assert [t for t, _, _ in answers[base][4]] != [t for t, _, _ in answers[base][5]]  # the adapter answers
        for want, got in zip(answers[single_base], answers[base]):
            assert [t for t, _, _ in got] == [t for t, _, _ in want] and len(want) > 0
            for (_, lp, alts), (_, lp_want, alts_want) in zip(got, want):
                assert abs(lp - lp_want) < 1e-4
                assert alts.keys() == alts_want.keys()
                assert all(abs(alts[k] - alts_want[k]) < 1e-4 for k in alts)
        assert len(_children(proc.pid)) >= 1  # rank 1 runs beside this process, which is rank 0
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: the server shuts down, tells rank 1 to stop, exits 130
        assert proc.wait(60) == 130
        err = proc.communicate()[1]
        assert "error" not in err.lower(), err[-2000:]
    finally:
        uv.should_exit = True
        if proc.poll() is None:
            proc.kill()


def test_server_stops_with_a_clear_message_when_a_rank_dies(tiny_ckpt):
    """A rank killed while the server is idle takes it down at once (no hang, no request needed) with one line
    naming the rank; the process exits non-zero."""
    import signal

    proc, _ = _serve(["--model", str(tiny_ckpt), "--tensor-parallel-size", "2", *SERVE_FLAGS])
    try:
        (worker,) = [c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()]
        os.kill(worker, signal.SIGKILL)
        code = proc.wait(60)
        err = proc.communicate()[1]
        assert code == 1
        assert "qwen2vl: error: tensor-parallel rank 1 of 2 died (signal SIGKILL); the other ranks were stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_server_under_torchrun(tiny_ckpt):
    """`torchrun --nproc-per-node 2 -m qwen2vl serve --tensor-parallel-size 2` (the way across hosts): rank 0
    serves, rank 1 follows its engine; the answer is the single-process server's."""
    import signal

    import httpx

    from qwen2vl.serve.config import ServerConfig
    from qwen2vl.serve.server import build_server, serve_in_thread

    body = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 9}
    single = build_server(ServerConfig(model=str(tiny_ckpt), served_model_name="m", dtype="float32"))
    uv, single_base = serve_in_thread(single)
    launcher = ("torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m")
    proc, base = _serve(["--model", str(tiny_ckpt), "--tensor-parallel-size", "2", *SERVE_FLAGS], launcher)
    try:
        answers = [httpx.post(b + "/v1/chat/completions", json=body, timeout=120).json() for b in (single_base, base)]
        texts = [a["choices"][0]["message"]["content"] for a in answers]
        assert texts[0] == texts[1] and texts[0]
    finally:
        uv.should_exit = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except Exception:
            proc.kill()
            raise
