"""Write a model as an official Qwen2-VL checkpoint directory: the source checkpoint's config, tokenizer, chat
template and preprocessor files, and model.safetensors under the original key names (`visual.*`, `model.*`,
`lm_head.*`, which transformers loads unchanged). LoRA layers are merged first (`merge_lora`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import Qwen2VLConfig
from ..lora import lora_modules, merge_lora

# files of a checkpoint directory that are not weights (copied as they are)
_SKIP = {"model.safetensors.index.json", "adapter_config.json", "adapter_model.safetensors", "trainer_state.json"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_checkpoint(
    model: nn.Module, source: str | Path, directory: str | Path, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` (merged if it carries LoRA) as a checkpoint in `directory`, in `dtype` (default: the source
    config's torch_dtype). The source directory supplies every non-weight file."""
    from safetensors.torch import save_file

    source, directory = Path(source), Path(directory)
    if directory.exists() and directory.resolve() == source.resolve():
        raise ValueError(
            f"{directory}: the output is the checkpoint the model was loaded from (its weights are mapped from those "
            "files); write the merged checkpoint to another directory"
        )
    directory.mkdir(parents=True, exist_ok=True)
    if lora_modules(model):
        merge_lora(model)
    config = json.loads((source / "config.json").read_text())
    dtype = dtype or Qwen2VLConfig.from_file(source).torch_dtype or torch.float32
    for path in source.iterdir():
        if path.is_file() and path.suffix in (".json", ".txt", ".jinja", ".model") and path.name not in _SKIP:
            shutil.copyfile(path, directory / path.name)
    config["torch_dtype"] = {v: k for k, v in _DTYPES.items()}[dtype]
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
