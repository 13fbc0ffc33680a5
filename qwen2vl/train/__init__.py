"""Fine-tuning Qwen2-VL: SFT data with assistant-only labels, LoRA (PEFT's format) or all weights, the reference's
loss and gradients. The model never imports this package; it transforms a loaded model."""

from ..lora import (
    AdapterError,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from .data import IGNORE, Example, collate, encode, read_jsonl
from .export import save_checkpoint
from .loss import causal_lm_loss, gradient_checkpointing, lr_lambda
from .trainer import TrainConfig, Trainer, TrainResult, finetune

__all__ = [
    "IGNORE",
    "AdapterError",
    "Example",
    "LoRAConfig",
    "LoRALinear",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "apply_lora",
    "causal_lm_loss",
    "collate",
    "encode",
    "finetune",
    "gradient_checkpointing",
    "load_adapter",
    "lr_lambda",
    "merge_lora",
    "read_jsonl",
    "save_adapter",
    "save_checkpoint",
]
