"""Where a model lives: a local directory, or a Hugging Face hub id downloaded (or found in the local hub cache)
with huggingface_hub, with a clear message when there is no network."""

from __future__ import annotations

import os
import re
from pathlib import Path

ALLOW = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class ModelNotFound(FileNotFoundError):
    pass


def resolve_model_path(name: str, revision: str | None = None) -> Path:
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} has no config.json: not a Qwen2-VL checkpoint directory")
        return path
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ModelNotFound(f"{name!r} is neither a checkpoint directory nor a hub id like 'Qwen/Qwen2-VL-2B-Instruct'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=ALLOW))
    except LocalEntryNotFoundError as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set and it is not in the local hub cache" if offline else \
            "the hub could not be reached (no network?) and it is not in the local hub cache"
        raise ModelNotFound(
            f"could not download {name}: {why}. Download it on a machine with a network "
            f"(huggingface-cli download {name} --local-dir DIR), copy DIR here and pass the directory instead "
            f"(--model DIR).") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFound(f"could not download {name}: {e}. If it exists, download it elsewhere with "
                            f"`huggingface-cli download {name} --local-dir DIR` and pass --model DIR.") from e
