"""qwen2vl: Qwen2-VL inference that matches transformers, in readable PyTorch.

    import qwen2vl
    model = qwen2vl.load_model("Qwen/Qwen2-VL-2B-Instruct", dtype=torch.bfloat16)
    logits = model(**batch)   # batch: the tensors the Qwen2-VL processor returns
"""

from .config import ConfigError, Qwen2VLConfig
from .model import KVCache, PlaceholderMismatch, Qwen2VL
from .weights import CheckpointError, load_model

__all__ = ["CheckpointError", "ConfigError", "KVCache", "PlaceholderMismatch", "Qwen2VL", "Qwen2VLConfig", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the processor lives in its own subpackage; import it on first use so `import qwen2vl` stays light
    if name == "Processor":
        from .processing import Processor

        return Processor
    raise AttributeError(f"module 'qwen2vl' has no attribute {name!r}")
