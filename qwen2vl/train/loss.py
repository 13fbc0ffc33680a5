"""The training loss and the pieces of the optimisation that have a reference to match.

- `causal_lm_loss` is transformers' `ForCausalLMLoss` (loss/loss_utils.py, what `Qwen2VLForConditionalGeneration`
  returns with `labels`): logits upcast to float32, labels shifted left by one with -100 appended, cross entropy
  with ignore_index=-100; the mean over the trained tokens, or, with `num_items` (the trained tokens of all the
  micro-batches of one optimizer step, the Trainer's `num_items_in_batch`), their sum divided by it, so that
  gradient accumulation gives the gradient of the whole batch.
- `lr_lambda` is transformers' `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup` (half a
  cosine) / `get_constant_schedule_with_warmup`, as the multiplier of torch's LambdaLR.
- `gradient_checkpointing` recomputes each decoder layer's and vision block's activations in the backward pass
  (torch.utils.checkpoint, non-reentrant), trading compute for memory; the gradients are the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.text import DecoderLayer
from ..model.vision import VisionBlock
from .data import IGNORE

SCHEDULES = ("cosine", "linear", "constant")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | None = None) -> torch.Tensor:
    """logits (B, L, V), labels (B, L) with IGNORE where untrained -> scalar loss (see the module docstring)."""
    logits = logits.float()
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].to(logits.device)  # token i predicts label i+1
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="mean" if num_items is None else "sum",
    )
    return loss if num_items is None else loss / num_items


def trained_tokens(labels: torch.Tensor) -> int:
    """How many positions a batch's labels train (the shifted targets that are not IGNORE)."""
    return int((labels[..., 1:] != IGNORE).sum())


def model_loss(
    model: nn.Module, batch: dict, num_items: int | None = None, vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """`causal_lm_loss` of the model on `batch`, projecting only the positions that are trained to the vocabulary:
    the same loss and gradients as the plain path (`causal_lm_loss(model(...), labels)`, which the tests compare),
    without the (B, L, vocab) logits, most of them of image and prompt tokens (a 2,000-token prompt of the 2B model
    has 1.2 GB of float32 logits).

    `vocab` (sorted token ids) is for a model whose output rows of every other token are zero (and stay zero:
    those tokens are never inputs of a tied model, and their logits get no gradient): their logits are exactly 0,
    so the full cross entropy is that of the logits of `vocab` plus one column log(V - len(vocab)) standing for the
    V - len(vocab) zero logits. The reference's loss, and its gradient for every weight but those rows (frozen at zero:
    the reference's softmax would move them), from len(vocab) logits a position instead of V (about 40 of 151,936 for
    the demo model). Every trained label must be in `vocab`; the Trainer checks the zero rows."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.hidden_states(**inputs)  # (B, L, H)
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE)[..., 1:].to(hidden.device)
    rows = targets != IGNORE
    if vocab is None:
        logits = model.logits(hidden[rows]).float()  # (trained positions, vocab)
        targets = targets[rows]
    else:
        weight = output_weight(model)
        logits = F.linear(hidden[rows], weight[vocab]).float()  # (trained positions, len(vocab))
        rest = weight.shape[0] - len(vocab)
        if rest > 0:  # the zero logits of the other tokens, summed: rest * e^0 = e^log(rest)
            logits = torch.cat([logits, logits.new_full((logits.shape[0], 1), math.log(rest))], dim=1)
        targets = targets[rows]
        where = torch.searchsorted(vocab, targets).clamp_max(len(vocab) - 1)  # each label's place in `vocab`
        if not bool((vocab[where] == targets).all()):
            missing = sorted(set(targets[vocab[where] != targets].tolist()))[:5]
            raise ValueError(f"trained tokens {missing} are outside the output vocabulary of this run")
        targets = where
    loss = F.cross_entropy(logits, targets, reduction="mean" if num_items is None else "sum")
    return loss if num_items is None else loss / num_items


def output_weight(model: nn.Module) -> torch.Tensor:
    """The (V, H) matrix that projects hidden states to logits: lm_head's, or the embedding's when tied."""
    return model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def gradient_checkpointing(model: nn.Module, enable: bool = True) -> None:
    """Checkpoint every decoder layer and vision block (instance-level forward), or undo it."""
    for module in model.modules():
        if not isinstance(module, (DecoderLayer, VisionBlock)):
            continue
        if not enable:
            module.__dict__.pop("forward", None)
        elif "forward" not in module.__dict__:
            plain = type(module).forward.__get__(module)

            def forward(*args, _plain=plain):
                if torch.is_grad_enabled():
                    return checkpoint(_plain, *args, use_reentrant=False)
                return _plain(*args)

            module.forward = forward
