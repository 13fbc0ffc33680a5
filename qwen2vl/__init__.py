"""qwen2vl: Qwen2-VL inference that matches transformers, in readable PyTorch.

    import qwen2vl
    pipe = qwen2vl.load("Qwen/Qwen2-VL-2B-Instruct")          # model + processor + generation defaults
    pipe.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"}, {"type": "text", "text": "?"}]}])

    model = qwen2vl.load_model(path, dtype=torch.float32)      # the bare model
    logits = model(**qwen2vl.Processor.from_pretrained(path)(conversation))
"""

from .config import ConfigError, Qwen2VLConfig
from .model import KVCache, PlaceholderMismatch, Qwen2VL
from .weights import CheckpointError, load_model

__all__ = ["CheckpointError", "ConfigError", "KVCache", "PlaceholderMismatch", "Qwen2VL", "Qwen2VLConfig", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # processing and the pipeline are imported on first use, so `import qwen2vl` stays light
    if name == "Processor":
        from .processing import Processor

        return Processor
    if name in ("load", "Pipeline", "ChatSession"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "SamplingParams":
        from .generate.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
