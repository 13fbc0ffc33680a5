"""Load official Qwen2-VL safetensors checkpoints into `Qwen2VL`, strictly and without holding weights twice.

Key names: the original upload layout (`visual.*`, `model.*`, `lm_head.*`, transformers 4.45-4.51 and the hub
files) and the layout transformers >= 4.52 may write (`model.visual.*`, `model.language_model.*`), mapped by the
one table below (the reference's `_checkpoint_conversion_mapping` / 5.x `conversion_mapping.py`). The model is
built on the meta device. Each file is memory-mapped copy-on-write: a tensor stored in the dtype the model wants
is a view of the map, so loading reads nothing and a page becomes resident when the model first touches it (as
transformers' safetensors loading and llama.cpp's GGUF loading do); a tensor that is converted (another dtype, a
quantized layer repacked) is read from the map once and its pages handed back (`release_pages`), so the peak is the
final weights plus one tensor. Writes into a mapped weight (a full fine-tune) go to private pages, never to the
file. `mmap=False`, and a tensor-parallel rank's share of a tensor, read into anonymous memory instead.
"""

from __future__ import annotations

import json
import math
import mmap as _mmap
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Qwen2VLConfig
from .model import Qwen2VL

# checkpoint prefix -> our prefix, tried in order (the first match wins)
PREFIX_RENAMES: tuple[tuple[str, str], ...] = (
    ("model.visual.", "visual."),
    ("model.language_model.", "model."),
)


# keys a checkpoint may carry that the model does not use, and when
REDUNDANT_WHEN_TIED = ("lm_head.weight",)

# quantized layers: freed heap memory is given back after every this many bytes of packed tensors
QUANT_TRIM_BYTES = 32 << 20

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """The checkpoint's files or tensors do not fit the model its config.json describes."""


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """The part of a checkpoint tensor one process reads: indices start..stop along `dim`, whose full size is
    `full` (a tensor-parallel rank's rows or columns; see qwen2vl.parallel)."""

    dim: int
    start: int
    stop: int
    full: int


def our_name(key: str) -> str:
    for old, new in PREFIX_RENAMES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json)")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"{directory}: the index names shards that are not there: {missing}")
    return files


def read_header(path: Path) -> tuple[dict, int]:
    """safetensors header {name: {dtype, shape, data_offsets}} and the byte offset where data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _layout(path: Path, info: dict) -> tuple[torch.dtype, list[int], int, int]:
    """A header entry's dtype, shape and byte range (relative to the data start), checked against each other."""
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor dtype {info['dtype']} is not supported")
    begin, end = info["data_offsets"]
    shape = list(info["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(
            f"{path}: the header gives {end - begin} bytes to a {info['dtype']} tensor of shape {tuple(shape)}"
        )
    return dtype, shape, begin, end


def _read_tensor(f, path: Path, info: dict, data_start: int, part: TensorSlice | None = None) -> torch.Tensor:
    """One tensor, or only `part` of it: one contiguous read per run of the kept indices (one in all when the
    slice is along the first dimension), straight into the result, so the rest is never in memory."""
    dtype, shape, begin, _ = _layout(path, info)
    outer, inner = 1, 0  # the whole tensor: one run
    if part is not None:
        if part.dim >= len(shape) or shape[part.dim] != part.full:
            raise CheckpointError(
                f"{path}: tensor of shape {tuple(shape)}, but a slice of dimension {part.dim} "
                f"of size {part.full} was asked for"
            )
        outer = math.prod(shape[: part.dim])
        inner = math.prod(shape[part.dim + 1 :]) * dtype.itemsize  # bytes per index along dim
        shape[part.dim] = part.stop - part.start
    t = torch.empty(shape, dtype=dtype)
    out = t.view(-1).view(torch.uint8).numpy()
    run = out.size // max(outer, 1)
    for i in range(outer if out.size else 0):
        # run i: rows i of the leading dimensions, indices start..stop of `dim` (or everything without a part)
        offset = begin + (i * part.full + part.start) * inner if part is not None else begin
        f.seek(data_start + offset)
        got = f.readinto(out[i * run : (i + 1) * run])
        if got != run:
            raise CheckpointError(f"{path}: truncated (wanted {run} bytes at {offset}, got {got})")
    return t


# base address of a mapped file's bytes -> the map, while it lives: what `release_pages` may hand back
_MAPPED: dict[int, weakref.ref] = {}


class MappedFile:
    """One safetensors file mapped copy-on-write (MAP_PRIVATE); `tensor` gives a header entry as a view of it."""

    def __init__(self, path: Path, data_start: int) -> None:
        self.path, self.data_start = path, data_start
        with open(path, "rb") as f:
            self.map = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)
        base = self.bytes.data_ptr()
        _MAPPED[base] = weakref.ref(self.map, lambda _, base=base: _MAPPED.pop(base, None))

    def tensor(self, info: dict) -> torch.Tensor:
        dtype, shape, begin, end = _layout(self.path, info)
        begin, end = self.data_start + begin, self.data_start + end
        if end > self.bytes.numel():
            raise CheckpointError(
                f"{self.path}: truncated (a tensor ends at byte {end}, the file at {self.bytes.numel()})"
            )
        raw = self.bytes[begin:end]
        if begin % dtype.itemsize:  # not aligned to its element size (safetensors' writer aligns; others may not)
            raw = raw.clone()
        return raw.view(dtype).view(shape)


def release_pages(t: torch.Tensor) -> bool:
    """Hand the pages of `t`, a view of a mapped checkpoint, back to the page cache (madvise DONTNEED on the pages
    wholly inside it): the process's resident set shrinks by what reading it faulted in, and a later read faults
    back in only what it touches. Only for pages nobody wrote (a private page's writes would be dropped): loading
    and quantizing call it on the tensors they have just converted. Returns whether `t` was mapped; anything else
    is left alone."""
    base = t.untyped_storage().data_ptr()
    ref = _MAPPED.get(base)
    mapped = ref() if ref is not None else None
    if mapped is None or not t.is_contiguous():
        return False
    if not hasattr(mapped, "madvise"):  # (no madvise on this platform: the pages stay until the map goes)
        return True
    start = t.data_ptr() - base
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // _mmap.PAGESIZE) * _mmap.PAGESIZE, end // _mmap.PAGESIZE * _mmap.PAGESIZE
    if hi > lo:
        mapped.madvise(_mmap.MADV_DONTNEED, lo, hi - lo)
    return True


def load_weights(
    model: Qwen2VL,
    directory: Path,
    dtype: torch.dtype,
    device: torch.device,
    progress: bool = True,
    scheme=None,
    slices: dict[str, TensorSlice | tuple[TensorSlice, ...] | None] | None = None,
    mmap: bool = True,
) -> None:
    """Fill a meta-device model from the checkpoint in `directory`. Strict: missing or unused keys raise.

    `mmap`: weights stored in `dtype` (on CPU) stay views of the mapped files (see the module docstring); False
    reads every tensor into anonymous memory.

    `slices`: parameters that hold only part of their checkpoint tensor (a tensor-parallel rank's share); only
    that part is read (a tuple: those parts, concatenated along their dimension; None: nothing is read, the
    parameter holds zeros).

    With a `scheme` (qwen2vl.quant.QuantScheme, from config.json's quantization_config), every layer stored as
    `<layer>.qweight` is read one layer at a time and replaced by a qwen2vl.quant.QuantLinear.
    """
    headers = [(path, *read_header(path)) for path in checkpoint_files(directory)]
    quantized: dict[str, torch.nn.Linear] = {}
    if scheme is None:
        packed = next((k for _, header, _ in headers for k in header if k.endswith(".qweight")), None)
        if packed is not None:
            raise CheckpointError(
                f"{directory}: {packed} is a quantized tensor, but config.json has no "
                "quantization_config saying which format it is in"
            )
    else:
        from . import quant

        quantized = quant.quantized_layers(model, [our_name(k) for _, header, _ in headers for k in header])
    expected = {name: p.shape for name, p in model.state_dict().items() if name.rpartition(".")[0] not in quantized}
    plan: list[tuple[Path, str, str, dict, int]] = []  # (file, checkpoint key, our name, info, data start)
    quant_plan: dict[str, dict[str, tuple[Path, str, dict, int]]] = {p: {} for p in quantized}
    unused: list[str] = []
    for path, header, start in headers:
        for key, info in header.items():
            name = our_name(key)
            layer, _, suffix = name.rpartition(".")
            if name in expected:
                plan.append((path, key, name, info, start))
            elif layer in quant_plan:
                quant_plan[layer][suffix] = (path, key, info, start)
            elif not (model.lm_head is None and name in REDUNDANT_WHEN_TIED):
                unused.append(key)
    seen = [name for _, _, name, _, _ in plan]
    missing = sorted(set(expected) - set(seen))
    dupes = sorted({n for n in seen if seen.count(n) > 1}) if len(seen) != len(set(seen)) else []
    quant_slices: dict[str, tuple[dict[str, TensorSlice], int]] = {}  # a rank's share: slices, first group
    for layer, tensors in quant_plan.items():  # each quantized layer: its tensors' shapes, before any reading
        linear, part = quantized[layer], (slices or {}).get(layer + ".weight")
        k = part.full if part is not None and part.dim == 1 else linear.in_features
        n = part.full if part is not None and part.dim == 0 else linear.out_features
        missing += _check_quantized(layer, k, n, linear.bias is not None, tensors, scheme, unused)
        if part is not None:
            from .quant import packed_slices

            quant_slices[layer] = packed_slices(layer, scheme, k, n, part)
    if missing or unused or dupes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unused:
            parts.append(f"{len(unused)} unused tensors: {sorted(unused)[:20]}{' ...' if len(unused) > 20 else ''}")
        if dupes:
            parts.append(f"tensors given twice (under both key layouts?): {dupes[:20]}")
        raise CheckpointError(
            f"{directory}: checkpoint does not match the model of its config.json; " + "; ".join(parts)
        )

    infos = [info for *_, info, _ in plan] + [info for t in quant_plan.values() for _, _, info, _ in t.values()]
    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for info in infos)
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {directory.name}", disable=not progress)
    handles: dict[Path, object] = {}
    maps: dict[Path, MappedFile] = {}

    def read(path: Path, info: dict, start: int, part: TensorSlice | None = None, count: bool = True) -> torch.Tensor:
        if part is None and mmap:
            t = (maps.get(path) or maps.setdefault(path, MappedFile(path, start))).tensor(info)
        else:
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            t = _read_tensor(f, path, info, start, part)
        if count:  # (once per tensor, however many parts are read)
            bar.update(info["data_offsets"][1] - info["data_offsets"][0])
        return t

    def convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = t.to(device=device, dtype=dtype)
        if out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():  # a copy: the map's pages go back
            release_pages(t)
        return out

    try:
        for path, key, name, info, start in plan:
            part = (slices or {}).get(name, "whole")
            if part is None:  # this rank holds zeros (a row-parallel bias, which one rank adds)
                t = torch.zeros(expected[name], dtype=_ST_DTYPES[info["dtype"]])
            elif isinstance(part, tuple):  # parts of the tensor, concatenated (a fused qkv's rows of some heads)
                t = torch.cat([read(path, info, start, p, count=p is part[0]) for p in part], dim=part[0].dim)
            else:
                t = read(path, info, start, None if part == "whole" else part)
            if tuple(t.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"{path.name}: {key} has shape {tuple(t.shape)}, the config needs {tuple(expected[name])}"
                )
            state[name] = convert(t, dtype if t.is_floating_point() else t.dtype)
        since_trim = 0
        for layer, tensors in quant_plan.items():  # one layer at a time: packed tensors in, final layout out
            cuts, first_group = quant_slices.get(layer, ({}, 0))
            read_back = {
                suffix: read(path, info, start, cuts.get(suffix)) for suffix, (path, _, info, start) in tensors.items()
            }
            if "g_idx" in read_back and first_group:  # a share of the inputs: its groups count from its first
                read_back["g_idx"] = read_back["g_idx"] - first_group
            if cuts.get("g_idx") is not None:
                _check_share_groups(layer, read_back["g_idx"], scheme, quantized[layer].in_features)
            _install_quantized(model, layer, read_back, quantized[layer], scheme, dtype, device)
            for t in read_back.values():  # repacked: the packed tensors' pages go back
                release_pages(t)
            since_trim += sum(t.numel() * t.element_size() for t in read_back.values())
            if since_trim > QUANT_TRIM_BYTES:  # see quant.release_freed_memory: bounds the peak's working set
                quant.release_freed_memory()
                since_trim = 0
    finally:
        for f in handles.values():
            f.close()
        bar.close()
    # strict above (missing / unused); the quantized layers are already in place, so only they may be absent here
    result = model.load_state_dict(state, strict=False, assign=True)
    left = [k for k in result.missing_keys if k.rpartition(".")[0] not in quantized] + result.unexpected_keys
    if left:
        raise CheckpointError(f"{directory}: internal error, tensors not placed: {left[:20]}")


def _check_quantized(layer: str, k: int, n: int, has_bias: bool, tensors: dict, scheme, unused: list[str]) -> list[str]:
    """Shapes and dtypes of one quantized layer's tensors (K inputs, N outputs in the checkpoint) against the
    config (from the headers); returns the missing names and appends the unexpected ones to `unused`."""
    from .quant import QuantizationError, layer_tensors

    layout = layer_tensors(layer, scheme, k, n)
    layout["bias"] = ((n,), torch.float16)
    for suffix, (_, key, info, _) in tensors.items():
        if suffix not in layout:
            unused.append(key)
            continue
        shape, dtype = layout[suffix]
        wrong_dtype = suffix != "bias" and _ST_DTYPES.get(info["dtype"]) not in (dtype, None)
        if tuple(info["shape"]) != shape or wrong_dtype:
            raise QuantizationError(
                f"{key} has shape {tuple(info['shape'])} and dtype {info['dtype']}; the config "
                f"needs {shape} {str(dtype).removeprefix('torch.')}"
            )
    needed = ["qweight", "qzeros", "scales"] + (["bias"] if has_bias else [])
    return [f"{layer}.{s}" for s in needed if s not in tensors]


def _check_share_groups(layer: str, g_idx: torch.Tensor, scheme, k: int) -> None:
    """A rank's share of a GPTQ layer's inputs holds whole groups only without act-order (g_idx = k // G)."""
    from .quant import QuantizationError

    if not torch.equal(g_idx.long(), torch.arange(k) // scheme.groups(k)[0]):
        raise QuantizationError(
            f"{layer}: GPTQ act-order (desc_act, a g_idx that is not k // group_size) cannot be split by input "
            "across tensor-parallel ranks (each rank's inputs would need groups it does not hold); load this "
            "checkpoint on one rank"
        )


def _install_quantized(
    model: Qwen2VL,
    layer: str,
    tensors: dict[str, torch.Tensor],
    linear: torch.nn.Linear,
    scheme,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    from .quant import QuantizationError, QuantLinear, read_layer

    storage = read_layer(layer, tensors, scheme, linear.in_features, linear.out_features)
    bias = tensors.get("bias")
    if linear.bias is None and bias is not None:  # older GPTQ revisions store zero biases the layer does not have
        if bool(bias.any()):
            raise QuantizationError(f"{layer}.bias is not zero, but this layer has no bias in Qwen2-VL")
        bias = None
    module = QuantLinear(
        linear.in_features,
        linear.out_features,
        scheme.bits,
        scheme.group_size,
        bias=bias is not None,
        permuted=storage.perm is not None,
        bias_dtype=dtype,
    )
    state = QuantLinear.state_from(storage)
    if bias is not None:
        state["bias"] = bias.to(dtype)
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
    parent, _, child = layer.rpartition(".")
    setattr(model.get_submodule(parent), child, module.to(device))


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: str | None = None,
    cpu_kernels: bool | None = None,
    cpu_matmul: str = "auto",
    adapter: str | Path | None = None,
    adapters: list[str | Path] | None = None,
    shard: Callable[[Qwen2VL], dict[str, TensorSlice | tuple[TensorSlice, ...] | None]] | None = None,
    mmap: bool = True,
) -> Qwen2VL:
    """Build Qwen2-VL from a checkpoint directory (or hub id) in `dtype` (default: the checkpoint's own) on `device`.

    On CPU, bf16 weights (and `quantize="int8"` or `"int4"`) run through `qwen2vl.cpu.use_cpu_kernels`: compact
    weights, float32 arithmetic. `"int4"` quantizes the decoder's projections group-wise to 4 bits
    (`qwen2vl.quant.rtn`) and the output projection to int8. `cpu_kernels=False` keeps plain PyTorch in the
    weights' own dtype, like the reference.
    `adapter`: a LoRA adapter directory in PEFT's format (`qwen2vl.lora`), applied on top of the weights.
    `adapters`: several, beside the weights, each request choosing one (`qwen2vl.lora.load_adapters`).
    `shard`: a transform of the meta-device model before any reading (qwen2vl.parallel: one tensor-parallel
    rank's share), returning the slices its parameters read.
    `mmap`: weights kept in the checkpoint's own dtype stay views of the memory-mapped files, resident once used
    (`load_weights`); False reads them into memory (a checkpoint on a network filesystem, or one that may change
    while the model runs: a mapped file that shrinks under the model crashes it with SIGBUS).
    """
    directory = Path(path)
    if not directory.is_dir():
        from .hub import resolve_model_path  # a hub id: download (or find in the local hub cache)

        directory = resolve_model_path(str(path))
    config = Qwen2VLConfig.from_file(directory)
    device = torch.device(device)
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"quantize must be None, 'int8' or 'int4', not {quantize!r}")
    scheme = None
    if config.quantization_config is not None:
        from .quant import QuantizationError, parse_quantization_config

        try:  # refuses, by name, every format and option it does not read, before any weight is read
            scheme = parse_quantization_config(config.quantization_config)
        except QuantizationError as e:
            raise type(e)(f"{directory / 'config.json'}: {e}") from None
        if quantize:
            raise ValueError(
                f"{directory} is already quantized ({scheme.method.upper()} "
                f"{scheme.bits}-bit); drop quantize={quantize!r}"
            )
        if dtype is None and device.type == "cpu":  # float16 arithmetic on CPU is slow: compute in float32
            dtype = torch.float32
    dtype = dtype or config.torch_dtype or torch.float32
    with torch.device("meta"):
        model = Qwen2VL(config)
    slices = shard(model) if shard is not None else None
    if quantize == "int4" and slices:
        from .quant.rtn import check_share_groups

        check_share_groups(slices)
    load_weights(model, directory, dtype, device, progress, scheme, slices, mmap)
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter, slices)
    if adapters:
        from .lora import load_adapters

        if adapter is not None:
            raise ValueError("give either adapter (applied to every request) or adapters (chosen per request)")
        load_adapters(model, adapters, slices)
    model.eval().requires_grad_(False)
    if cpu_kernels is None:
        cpu_kernels = device.type == "cpu" and (dtype == torch.bfloat16 or quantize is not None)
    if quantize and not cpu_kernels:
        raise ValueError(f"quantize={quantize!r} runs through the CPU kernels; it needs device='cpu' and cpu_kernels")
    if quantize == "int4":  # the decoder's projections to 4 bits (group-wise); the output projection then int8
        from .quant.rtn import quantize_decoder_int4

        quantize_decoder_int4(model, release=True)  # (fresh from the checkpoint: nothing has written the weights)
    if cpu_kernels:
        from .cpu import use_cpu_kernels

        storage = {"int4": "int8"}.get(quantize, quantize or "bf16")
        use_cpu_kernels(model, storage=storage, matmul=cpu_matmul, release=True)
    return model
