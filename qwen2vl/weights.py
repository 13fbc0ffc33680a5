"""Load official Qwen2-VL safetensors checkpoints into `Qwen2VL`, strictly and without holding weights twice.

Key names: the original upload layout (`visual.*`, `model.*`, `lm_head.*`, transformers 4.45-4.51 and the hub
files) and the layout transformers >= 4.52 may write (`model.visual.*`, `model.language_model.*`), mapped by the
one table below (the reference's `_checkpoint_conversion_mapping` / 5.x `conversion_mapping.py`). The model is
built on the meta device; each tensor is read from the file straight into its final buffer (no mmap, so the
page cache is not charged to the process) and converted to the target dtype one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
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


# our parameter name -> layout conversion applied to the checkpoint tensor (none needed today: every parameter
# keeps the checkpoint's shape; a fused or re-laid-out parameter would register its conversion here)
CONVERSIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

# keys a checkpoint may carry that the model does not use, and when
REDUNDANT_WHEN_TIED = ("lm_head.weight",)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """The checkpoint's files or tensors do not fit the model its config.json describes."""


def our_name(key: str) -> str:
    for old, new in PREFIX_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
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


def _read_tensor(f, path: Path, info: dict, data_start: int) -> torch.Tensor:
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
        raise CheckpointError(f"{path}: tensor dtype {info['dtype']} is not supported")
    begin, end = info["data_offsets"]
    t = torch.empty(info["shape"], dtype=dtype)
    if end > begin:
        f.seek(data_start + begin)
        got = f.readinto(t.view(-1).view(torch.uint8).numpy())
        if got != end - begin:
            raise CheckpointError(f"{path}: truncated (wanted {end - begin} bytes at {begin}, got {got})")
    return t


def load_weights(model: Qwen2VL, directory: Path, dtype: torch.dtype, device: torch.device, progress: bool = True) -> None:
    """Fill a meta-device model from the checkpoint in `directory`. Strict: missing or unused keys raise."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    plan: list[tuple[Path, str, str, dict, int]] = []  # (file, checkpoint key, our name, info, data start)
    unused: list[str] = []
    for path in checkpoint_files(directory):
        header, start = read_header(path)
        for key, info in header.items():
            name = our_name(key)
            if name in expected:
                plan.append((path, key, name, info, start))
            elif not (model.lm_head is None and name in REDUNDANT_WHEN_TIED):
                unused.append(key)
    seen = [name for _, _, name, _, _ in plan]
    missing = sorted(set(expected) - set(seen))
    dupes = sorted({n for n in seen if seen.count(n) > 1}) if len(seen) != len(set(seen)) else []
    if missing or unused or dupes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {missing[:20]}{' ...' if len(missing) > 20 else ''}")
        if unused:
            parts.append(f"{len(unused)} unused tensors: {sorted(unused)[:20]}{' ...' if len(unused) > 20 else ''}")
        if dupes:
            parts.append(f"tensors given twice (under both key layouts?): {dupes[:20]}")
        raise CheckpointError(f"{directory}: checkpoint does not match the model of its config.json; " + "; ".join(parts))

    total = sum(info["data_offsets"][1] - info["data_offsets"][0] for *_, info, _ in plan)
    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {directory.name}", disable=not progress)
    handles: dict[Path, object] = {}
    try:
        for path, key, name, info, start in plan:
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            t = _read_tensor(f, path, info, start)
            if name in CONVERSIONS:
                t = CONVERSIONS[name](t)
            if tuple(t.shape) != tuple(expected[name]):
                raise CheckpointError(
                    f"{path.name}: {key} has shape {tuple(t.shape)}, the config needs {tuple(expected[name])}")
            state[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            bar.update(info["data_offsets"][1] - info["data_offsets"][0])
    finally:
        for f in handles.values():
            f.close()
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)


def load_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize: str | None = None,
    cpu_kernels: bool | None = None,
    cpu_matmul: str = "auto",
    adapter: str | Path | None = None,
) -> Qwen2VL:
    """Build Qwen2-VL from a checkpoint directory (or hub id) in `dtype` (default: the checkpoint's own) on `device`.

    On CPU, bf16 weights (and `quantize="int8"`) run through `qwen2vl.cpu.use_cpu_kernels`: compact weights,
    float32 arithmetic. `cpu_kernels=False` keeps plain PyTorch in the weights' own dtype, like the reference.
    `adapter`: a LoRA adapter directory in PEFT's format (`qwen2vl.train.lora`), applied on top of the weights.
    """
    directory = Path(path)
    if not directory.is_dir():
        from .hub import resolve_model_path  # a hub id: download (or find in the local hub cache)

        directory = resolve_model_path(str(path))
    config = Qwen2VLConfig.from_file(directory)
    dtype = dtype or config.torch_dtype or torch.float32
    with torch.device("meta"):
        model = Qwen2VL(config)
    device = torch.device(device)
    load_weights(model, directory, dtype, device, progress)
    if adapter is not None:
        from .train.lora import load_adapter

        load_adapter(model, adapter)
    model.eval().requires_grad_(False)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', not {quantize!r}")
    if cpu_kernels is None:
        cpu_kernels = device.type == "cpu" and (dtype == torch.bfloat16 or quantize is not None)
    if quantize and not cpu_kernels:
        raise ValueError("quantize='int8' runs through the CPU kernels; it needs device='cpu' and cpu_kernels")
    if cpu_kernels:
        from .cpu import use_cpu_kernels

        use_cpu_kernels(model, storage=quantize or "bf16", matmul=cpu_matmul)
    return model
