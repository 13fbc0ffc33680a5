"""Random quantized Qwen2-VL checkpoints in the official AWQ and GPTQ on-disk formats, and their dense twins.

`write_quantized` takes the random weights of `qwen2vl.testing.checkpoint`, quantizes the decoder's q/k/v/o and
gate/up/down projections group-wise and writes them as the releases do: AutoAWQ GEMM (`qweight`/`qzeros` int32
packed along the output dimension in AWQ's interleaved nibble order, `scales` float16, K-major) or AutoGPTQ v1
(`qweight` int32 packed along the input dimension, `qzeros` packed along the output dimension and stored minus one,
`scales` float16, `g_idx` int32), with `quantization_config` in config.json. Everything else (vision tower,
embeddings, lm_head, norms, q/k/v biases) stays float16, `torch_dtype: float16`.

The dense twin (`dense_directory`) holds the same network with each quantized layer replaced by its float16
weight `float16(q - z) * s`, computed here from the integers before packing (so it does not share the readers'
unpacking code): the reference a quantized load must match. Packing is written from the format descriptions, not
from AutoAWQ/AutoGPTQ; tests check it against their dequantizers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import GENERATION_CONFIG, make_config, random_tensor, tensor_shapes

QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble p of a packed AWQ int32 holds column 8c + AWQ_ORDER[p]


def awq_config(group_size: int = 128) -> dict[str, Any]:
    """quantization_config as Qwen/Qwen2-VL-*-Instruct-AWQ's config.json has it."""
    return {
        "bits": 4,
        "group_size": group_size,
        "modules_to_not_convert": ["visual"],
        "quant_method": "awq",
        "version": "gemm",
        "zero_point": True,
    }


def gptq_config(bits: int = 4, group_size: int = 128, desc_act: bool = False, sym: bool = True) -> dict[str, Any]:
    """quantization_config as Qwen/Qwen2-VL-*-Instruct-GPTQ-Int{4,8}'s config.json has it (transformers'
    GPTQConfig.to_dict after an optimum/AutoGPTQ run)."""
    return {
        "bits": bits,
        "damp_percent": 0.01,
        "desc_act": desc_act,
        "group_size": group_size,
        "modules_in_block_to_quantize": None,
        "quant_method": "gptq",
        "sym": sym,
        "true_sequential": True,
        "batch_size": 1,
        "block_name_to_quantize": None,
        "cache_block_outputs": True,
        "dataset": None,
        "exllama_config": {"version": 1},
        "max_input_length": None,
        "model_seqlen": None,
        "module_name_preceding_first_block": None,
        "pad_token_id": None,
        "tokenizer": None,
        "use_cuda_fp16": False,
        "use_exllama": False,
    }


def quantize_groups(
    w: torch.Tensor, bits: int, group_of: torch.Tensor, n_groups: int, sym: bool, zero_min: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise quantization of W (N, K): q (N, K) int64, scales float16 (N, n_groups),
    zeros (N, n_groups) int64 in zero_min..2^bits-1. `group_of[k]` is input k's group."""
    maxq = 2**bits - 1
    n = w.shape[0]
    scales = torch.empty(n, n_groups, dtype=torch.float16)
    zeros = torch.empty(n, n_groups, dtype=torch.int64)
    for g in range(n_groups):
        cols = w[:, group_of == g].float()
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            s = torch.maximum(-lo, hi) * 2 / maxq
            z = torch.full((n,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            s = (hi - lo) / maxq
            z = torch.round(-lo / s.clamp(min=1e-8)).long()
        scales[:, g] = torch.where(s > 0, s, torch.ones_like(s)).half()  # an all-zero group (72B padding)
        zeros[:, g] = z.clamp(zero_min, maxq)
    s_k, z_k = scales[:, group_of].float(), zeros[:, group_of]
    q = torch.clamp(torch.round(w.float() / s_k) + z_k, 0, maxq).long()
    return q, scales, zeros


def dequantize(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_of: torch.Tensor) -> torch.Tensor:
    """The formats' float16 weight: float16(q - z) * s, per input's group."""
    return (q - zeros[:, group_of]).to(torch.float16) * scales[:, group_of]


def _int32(x: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values held in int64 -> the same bits as int32."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def pack_awq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors from q (N, K), scales/zeros (N, n_groups)."""

    def pack(x: torch.Tensor) -> torch.Tensor:  # (R, N) -> (R, N/8), along N, interleaved
        x = x.view(x.shape[0], -1, 8)
        return _int32(sum(x[:, :, AWQ_ORDER[p]] << (4 * p) for p in range(8)))

    return {
        "qweight": pack(q.t().contiguous()),
        "qzeros": pack(zeros.t().contiguous()),
        "scales": scales.t().contiguous(),
    }


def pack_gptq(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> dict[str, torch.Tensor]:
    """AutoGPTQ v1 tensors from q (N, K), scales/zeros (N, n_groups), g_idx (K,)."""
    pf, mask = 32 // bits, 2**bits - 1
    qk = q.t().contiguous().view(-1, pf, q.shape[0])  # (K/pf, pf, N): along K
    qweight = _int32(sum(qk[:, j] << (bits * j) for j in range(pf)))
    z = ((zeros.t() - 1) & mask).contiguous().view(zeros.shape[1], -1, pf)  # stored minus one, along N
    qzeros = _int32(sum(z[:, :, j] << (bits * j) for j in range(pf)))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.t().contiguous(), "g_idx": g_idx.to(torch.int32)}


def write_quantized(
    directory: str | Path,
    method: str,
    *,
    bits: int = 4,
    group_size: int = 128,
    desc_act: bool = False,
    sym: bool = True,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    zero_biases: bool = False,
    dense_directory: str | Path | None = None,
    tokenizer: bool = False,
    padded_from: int | None = None,
) -> Path:
    """Write a random quantized checkpoint ("awq" or "gptq"); with `dense_directory`, its dense float16 twin.

    zero_biases: add the all-zero `.bias` tensors older GPTQ revisions carry for o/gate/up/down.
    padded_from: the MLP's true width when config's intermediate_size is padded past it, as the quantized 72B
    releases pad 29568 to 29696: gate/up rows and down columns from there on are zero.
    """
    if method not in ("awq", "gptq"):
        raise ValueError(f"method must be 'awq' or 'gptq', not {method!r}")
    config = make_config() if config is None else config
    qcfg = awq_config(group_size) if method == "awq" else gptq_config(bits, group_size, desc_act, sym)
    gen = torch.Generator().manual_seed(seed)
    dense = {
        name: random_tensor(name, shape, gen, torch.float32).half() for name, shape in tensor_shapes(config).items()
    }
    quantized: dict[str, torch.Tensor] = {}
    for name in list(dense):
        if not QUANTIZED.fullmatch(name):
            quantized[name] = dense[name]
            continue
        w = dense[name]
        if padded_from is not None and name.endswith(("gate_proj.weight", "up_proj.weight")):
            w = w.clone()
            w[padded_from:] = 0
        elif padded_from is not None and name.endswith("down_proj.weight"):
            w = w.clone()
            w[:, padded_from:] = 0
        n, k = w.shape
        g = k if group_size == -1 else group_size
        n_groups = -(-k // g)
        group_of = torch.arange(k) // g
        if desc_act:  # act-order: groups follow a permutation of the inputs (GPTQ's order by Hessian diagonal)
            order = torch.randperm(k, generator=gen)
            group_of = torch.empty(k, dtype=torch.int64)
            group_of[order] = torch.arange(k) // g
        # GPTQ v1 cannot store a zero of 0 unambiguously (stored minus one): keep zeros >= 1 there
        q, scales, zeros = quantize_groups(w, bits, group_of, n_groups, sym, zero_min=1 if method == "gptq" else 0)
        prefix = name[: -len(".weight")]
        packed = pack_awq(q, scales, zeros) if method == "awq" else pack_gptq(q, scales, zeros, group_of, bits)
        quantized.update({f"{prefix}.{suffix}": t for suffix, t in packed.items()})
        if zero_biases and f"{prefix}.bias" not in dense:
            quantized[f"{prefix}.bias"] = torch.zeros(n, dtype=torch.float16)
        dense[name] = dequantize(q, scales, zeros, group_of)
    directory = _write(Path(directory), quantized, {**config, "quantization_config": qcfg}, tokenizer)
    if dense_directory is not None:
        _write(Path(dense_directory), dense, config, tokenizer)
    return directory


def write_random_packed(
    directory: str | Path, config: dict[str, Any], quantization_config: dict[str, Any], seed: int = 0
) -> tuple[Path, int]:
    """A quantized checkpoint of random packed bits (fast at any size: nothing is quantized), for memory and load-time
    measurements where the numbers do not matter; returns (directory, bytes of packed tensors)."""
    from ..quant import layer_tensors, parse_quantization_config

    scheme = parse_quantization_config(quantization_config)
    gen = torch.Generator().manual_seed(seed)
    tensors, packed_bytes = {}, 0
    for name, shape in tensor_shapes(config).items():
        if not QUANTIZED.fullmatch(name):
            tensors[name] = random_tensor(name, shape, gen, torch.float16)
            continue
        prefix = name[: -len(".weight")]
        for suffix, (packed_shape, dtype) in layer_tensors(prefix, scheme, shape[1], shape[0]).items():
            if suffix == "g_idx":
                t = (torch.arange(shape[1]) // scheme.groups(shape[1])[0]).to(torch.int32)
            elif dtype == torch.int32:
                t = torch.randint(-(2**31), 2**31, packed_shape, generator=gen, dtype=torch.int64).to(torch.int32)
            else:
                t = (torch.rand(packed_shape, generator=gen) * 0.01).half()
            tensors[f"{prefix}.{suffix}"] = t
            packed_bytes += t.numel() * t.element_size()
    return _write(Path(directory), tensors, {**config, "quantization_config": quantization_config}, False), packed_bytes


def _write(directory: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], tokenizer: bool) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**config, "torch_dtype": "float16"}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    if tokenizer:
        from .tokenizer_files import write_preprocessor_config, write_tokenizer_files

        write_tokenizer_files(directory)
        write_preprocessor_config(directory)
    return directory
