"""The layering docs/architecture.md describes, enforced on every import in the package (function-level ones too):
each layer imports only what sits below it, so the model never learns about the engine, the server, training or
quantization, and input preparation never needs the model."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qwen2vl"

# layer -> the qwen2vl modules it may import (besides itself); a prefix covers a package and its modules
ALLOWED = {
    "qwen2vl.config": set(),
    "qwen2vl.hub": set(),
    "qwen2vl.kernels": set(),
    "qwen2vl.model": {"qwen2vl.config"},
    "qwen2vl.processing": {"qwen2vl.hub"},
    "qwen2vl.grounding": set(),
    "qwen2vl.generate": {"qwen2vl.model", "qwen2vl.config"},
    # rank 0's hand-over to the other tensor-parallel ranks: torch.distributed only, below everything that uses it
    "qwen2vl.parallel.commands": set(),
    "qwen2vl.engine": {"qwen2vl.model", "qwen2vl.config", "qwen2vl.generate", "qwen2vl.parallel.commands"},
}
# for every other module: the layers above it that it must not import
FORBIDDEN_ABOVE = {
    "qwen2vl.weights": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.pipeline", "qwen2vl.cli", "qwen2vl.train"},
    "qwen2vl.cpu": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.pipeline", "qwen2vl.cli", "qwen2vl.train"},
    "qwen2vl.quant": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.pipeline", "qwen2vl.cli", "qwen2vl.train"},
    "qwen2vl.lora": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.pipeline", "qwen2vl.cli", "qwen2vl.train"},
    "qwen2vl.train": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.cli"},
    "qwen2vl.pipeline": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.cli", "qwen2vl.train"},
    "qwen2vl.serve": {"qwen2vl.cli", "qwen2vl.train"},
    "qwen2vl.testing": {"qwen2vl.engine", "qwen2vl.serve", "qwen2vl.pipeline", "qwen2vl.cli", "qwen2vl.train"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every qwen2vl module `path` imports, relative imports resolved (`from . import x` names x itself)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from . import kernels` is qwen2vl.kernels
    return {m for m in found if m == "qwen2vl" or m.startswith("qwen2vl.")}


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str, table: dict) -> str | None:
    return next((layer for layer in table if within(module, layer)), None)


def is_module(name: str) -> bool:
    """True for a module or package of qwen2vl (not a name imported from one)."""
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").exists() or (PACKAGE.parent / rel / "__init__.py").exists()


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        targets = {t for t in imports_of(path) if is_module(t) and t != "qwen2vl"}
        allowed_layer = layer_of(me, ALLOWED)
        if allowed_layer is not None:
            ok = ALLOWED[allowed_layer] | {allowed_layer}
            found += [f"{me} imports {t}" for t in sorted(targets) if not any(within(t, a) for a in ok)]
        forbidden_layer = layer_of(me, FORBIDDEN_ABOVE)
        if forbidden_layer is not None:
            bad = FORBIDDEN_ABOVE[forbidden_layer]
            found += [f"{me} imports {t}" for t in sorted(targets) if any(within(t, b) for b in bad)]
    return found


def test_each_layer_imports_only_what_is_below_it():
    assert violations() == []


def test_the_rule_sees_relative_and_function_level_imports(tmp_path, monkeypatch):
    # the checker itself: a model file importing the engine inside a function is caught
    fake = tmp_path / "qwen2vl"
    (fake / "model").mkdir(parents=True)
    (fake / "engine").mkdir()
    for f in ("__init__.py", "model/__init__.py", "engine/__init__.py", "engine/engine.py", "config.py"):
        (fake / f).write_text("")
    (fake / "model" / "text.py").write_text("from ..config import X\n\ndef f():\n    from ..engine.engine import E\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == ["qwen2vl.model.text imports qwen2vl.engine.engine"]
