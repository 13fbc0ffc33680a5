"""qwen2vl: Qwen2-VL inference that matches transformers, in readable PyTorch.

    import qwen2vl
    pipe = qwen2vl.load("Qwen/Qwen2-VL-2B-Instruct")          # model + processor + generation defaults
    pipe.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "?"}]}])

    directory = qwen2vl.resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")   # download once (or a local directory)
    model = qwen2vl.load_model(directory, dtype=torch.float32)             # the bare model
    logits = model(**qwen2vl.Processor.from_pretrained(directory)(conversation))

Every name is imported on first use (PEP 562), so `import qwen2vl` and `qwen2vl --help` do not import torch.
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "ConfigError": ".config",
    "Qwen2VLConfig": ".config",
    "KVCache": ".model",
    "PlaceholderMismatch": ".model",
    "Qwen2VL": ".model",
    "CheckpointError": ".weights",
    "load_model": ".weights",
    "Processor": ".processing",
    "ChatSession": ".pipeline",
    "Pipeline": ".pipeline",
    "load": ".pipeline",
    "SamplingParams": ".generate.sampling",
    "resolve_model_path": ".hub",
}

__all__ = [
    "ChatSession",
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "Pipeline",
    "PlaceholderMismatch",
    "Processor",
    "Qwen2VL",
    "Qwen2VLConfig",
    "SamplingParams",
    "load",
    "load_model",
    "resolve_model_path",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name], __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
