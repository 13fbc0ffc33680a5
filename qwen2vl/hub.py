"""Where a model lives: a local checkpoint directory, or a Hugging Face hub id (`org/name`) fetched with
`huggingface_hub.snapshot_download` (its tqdm progress bars; the local hub cache is used when the files are there),
with an error that says what to do when there is no network. The commands it names (`hf download`, `hf auth
login`) are those of huggingface_hub >= 0.34, the version this package requires; older ones had `huggingface-cli`,
which 1.0 no longer installs."""

from __future__ import annotations

import os
from pathlib import Path

# what loading needs: config + generation/preprocessor/tokenizer json, weights, merges/vocab, chat templates
ALLOW = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class ModelNotFound(FileNotFoundError):
    pass


def _offline() -> bool:
    import huggingface_hub.constants as constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _looks_like_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return name.count("/") == 1


def _checkpoint_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"{path} has no config.json: not a Qwen2-VL checkpoint directory "
            f"(expected config.json, *.safetensors and the tokenizer files)"
        )
    return path


def resolve_model_path(name: str, revision: str | None = None) -> Path:
    """A local checkpoint directory as it is; a hub id downloaded (or found in the hub cache) -> its snapshot dir."""
    if not name.strip():
        raise ModelNotFound("the model path is empty: give a checkpoint directory or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        return _checkpoint_dir(path)
    if path.exists() or not _looks_like_hub_id(name):
        raise ModelNotFound(f"{name!r} is neither a checkpoint directory nor a hub id like 'Qwen/Qwen2-VL-2B-Instruct'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    instead = (
        f"Download it on a machine with a network (hf download {name} --local-dir DIR), "
        f"copy DIR here and pass the directory instead (--model DIR)."
    )
    offline = _offline()
    try:
        snapshot = snapshot_download(name, revision=revision, allow_patterns=ALLOW, local_files_only=offline)
    except LocalEntryNotFoundError as e:
        why = (
            "HF_HUB_OFFLINE is set"
            if offline
            else "the hub could not be reached (no network, or huggingface.co is blocked)"
        )
        raise ModelNotFound(
            f"could not download {name}: {why}, and it is not in the local hub cache "
            f"(no local directory of that name either). {instead}"
        ) from e
    except GatedRepoError as e:
        raise ModelNotFound(
            f"could not download {name}: it is gated; accept its terms on huggingface.co and "
            f"log in (hf auth login), or: {instead}"
        ) from e
    except RepositoryNotFoundError as e:
        raise ModelNotFound(
            f"could not download {name}: no such repository on the hub (or it is private; log in "
            f"with hf auth login), and no local directory of that name"
        ) from e
    except RevisionNotFoundError as e:
        raise ModelNotFound(f"could not download {name}: it has no revision {revision!r}") from e
    except (HfHubHTTPError, OSError) as e:
        raise ModelNotFound(f"could not download {name}: {e}. {instead}") from e
    return _checkpoint_dir(Path(snapshot))
