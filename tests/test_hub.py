"""Model location without a network: local directories, hub ids from a fake local hub cache, clear errors."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as constants
import pytest
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError

from qwen2vl.hub import ALLOW, ModelNotFound, resolve_model_path

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under a fresh HF_HOME, and a hub that cannot be reached (a closed local port)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hf" / "hub"


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, str]) -> Path:
    """The layout snapshot_download leaves behind: models--org--name/{snapshots/<rev>/..., refs/main}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


def test_a_local_checkpoint_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path


def test_a_local_directory_without_config_json_is_named_in_the_error(tmp_path):
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(ModelNotFound, match=f"{tmp_path} has no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("name", ["/no/such/dir/anywhere", "../nope", "a/b/c", "just-a-name", "bad--id/x"])
def test_a_missing_path_that_is_not_a_hub_id(name):
    with pytest.raises(ModelNotFound, match="neither a checkpoint directory nor a hub id"):
        resolve_model_path(name)


def test_an_empty_name_is_not_the_current_directory():
    with pytest.raises(ModelNotFound, match="the model path is empty"):
        resolve_model_path(" ")


def test_an_existing_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("")
    with pytest.raises(ModelNotFound, match="neither a checkpoint directory"):
        resolve_model_path(str(tmp_path / "org" / "name"))


def test_offline_and_not_cached_says_how_to_get_the_model(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when called, not only when huggingface_hub was imported
    with pytest.raises(ModelNotFound) as e:
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")
    message = str(e.value)
    assert "could not download Qwen/Qwen2-VL-2B-Instruct: HF_HUB_OFFLINE is set" in message
    assert "hf download Qwen/Qwen2-VL-2B-Instruct --local-dir DIR" in message and "--model DIR" in message


def test_no_network_and_not_cached_says_why(hub_cache):
    with pytest.raises(ModelNotFound, match="the hub could not be reached .* --local-dir DIR.*--model DIR"):
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")


@pytest.mark.parametrize("offline", [True, False])
def test_a_cached_model_resolves_without_a_network(hub_cache, monkeypatch, offline):
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_snapshot(hub_cache, "org/tiny", {"config.json": "{}", "model.safetensors": ""})
    assert resolve_model_path("org/tiny") == snapshot
    assert resolve_model_path("org/tiny", revision=REV) == snapshot


def test_a_cached_snapshot_without_config_json_is_an_error(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_snapshot(hub_cache, "org/partial", {"model.safetensors": ""})
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model_path("org/partial")


def test_download_asks_only_for_the_files_loading_needs(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        (tmp_path / "config.json").write_text("{}")
        return str(tmp_path)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert resolve_model_path("Qwen/Qwen2-VL-7B-Instruct", revision="v1") == tmp_path
    assert calls == [
        ("Qwen/Qwen2-VL-7B-Instruct", {"revision": "v1", "allow_patterns": ALLOW, "local_files_only": False})
    ]
    assert {"*.json", "*.safetensors", "*.txt", "*.jinja"} <= set(ALLOW)


@pytest.mark.parametrize(
    "error, message",
    [
        (RepositoryNotFoundError("404"), "no such repository on the hub"),
        (GatedRepoError("401"), "it is gated; accept its terms"),
    ],
)
def test_hub_errors_are_explained(monkeypatch, error, message):
    def fail(repo_id, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(ModelNotFound, match=message):
        resolve_model_path("org/name")


def test_the_advice_names_commands_the_installed_huggingface_hub_has(hub_cache, monkeypatch):
    """`huggingface-cli` is gone from huggingface_hub 1.0; the advice names `hf`, which the required version has."""
    import re
    import shutil
    import subprocess
    import sys

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as e:
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")
    assert "huggingface-cli" not in str(e.value)
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    assert hf, "huggingface_hub installs the `hf` command"
    for command, flag in ((["download", "--help"], "--local-dir"), (["auth", "login", "--help"], "--token")):
        out = subprocess.run([hf, *command], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and flag in out.stdout
    required = re.search(r'"huggingface_hub>=([\d.]+)"', (Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert tuple(map(int, required.group(1).split("."))) >= (0, 34)  # the first version with `hf`
