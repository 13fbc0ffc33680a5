"""Supervised fine-tuning: LoRA (default) or all weights, AdamW, a warmup + decay schedule, gradient accumulation,
gradient checkpointing, evaluation, checkpoints and resume.

    from qwen2vl.train import TrainConfig, finetune
    finetune("Qwen/Qwen2-VL-2B-Instruct", "train.jsonl", "out", TrainConfig(epochs=3), eval_data="eval.jsonl")

The maths per step is the reference's (`loss.py`): the batch loss is the mean cross entropy over all trained tokens
of the optimizer step's micro-batches. Order and randomness are fixed by `seed` (the shuffle of epoch e uses
seed + e; LoRA's initialisation uses seed), so a run stopped and resumed from a checkpoint takes the same steps.
Output: LoRA -> adapter_config.json + adapter_model.safetensors (PEFT's format, `qwen2vl/lora.py`); full -> an official
checkpoint (`export.py`). Intermediate checkpoints go to DIR/checkpoint-STEP with the optimizer and schedule state.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..lora import (
    LoRAConfig,
    apply_lora,
    read_adapter,
    save_adapter,
    set_adapter_weights,
)
from ..processing import Processor
from ..weights import load_model
from .data import check, collate, encode, read_jsonl
from .export import save_checkpoint
from .loss import gradient_checkpointing, lr_lambda, model_loss, output_weight, trained_tokens

STATE = "trainer_state.json"


@dataclass(frozen=True)
class TrainConfig:
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)  # None: train all weights (`--full`)
    train_vision: bool = False  # full fine-tuning: also the vision tower (frozen by default)
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 1  # conversations per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    save_steps: int | None = None  # a checkpoint every this many optimizer steps
    eval_steps: int | None = None  # evaluate every this many steps (and at the end, with eval data)
    seed: int = 0
    # None, or the only tokens whose output rows are non-zero (checked): the same loss over the whole vocabulary,
    # computed from these logits alone (`model_loss`); for a model trained from scratch on a few tokens (the demo's)
    output_vocab: tuple[int, ...] | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"the learning rate must be positive, not {self.lr}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, not {self.epochs}")
        lr_lambda(self.schedule, 0, 1)  # refuses an unknown schedule


@dataclass
class TrainResult:
    steps: int
    train_loss: float  # the last step's
    eval_loss: float | None
    tokens: int  # input tokens seen (attention mask), all steps
    seconds: float
    output: Path
    history: list[dict] = field(default_factory=list)  # per step: step, loss, lr, (eval_loss)


class Trainer:
    """The training state of one run: model, processor, data, optimizer, schedule and where it stands."""

    def __init__(
        self,
        model_path: str | Path,
        data,
        output: str | Path,
        config: TrainConfig = TrainConfig(),
        eval_data=None,
        progress: bool = True,
    ) -> None:
        self.config, self.output, self.progress = config, Path(output), progress
        self.model_path = Path(model_path)
        if not self.model_path.is_dir():
            from ..hub import resolve_model_path

            self.model_path = Path(resolve_model_path(str(model_path)))
        self.train_set = data if isinstance(data, list) else read_jsonl(data)
        self.eval_set = (
            None if eval_data is None else (eval_data if isinstance(eval_data, list) else read_jsonl(eval_data))
        )
        self.processor = Processor.from_pretrained(self.model_path)
        for name, conversations in (("training data", self.train_set), ("eval data", self.eval_set or [])):
            for i, conversation in enumerate(conversations):
                check(self.processor, conversation, f"{name}, conversation {i}")
        self.model = load_model(
            self.model_path, dtype=config.dtype, device=config.device, progress=progress, cpu_kernels=False
        )
        self._set_trainable()
        if config.gradient_checkpointing:
            gradient_checkpointing(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]  # biases and norms, as transformers' Trainer
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
        )
        per_epoch = math.ceil(math.ceil(len(self.train_set) / config.batch_size) / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        warmup = config.warmup_steps or math.ceil(config.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(config.schedule, warmup, self.total_steps)
        )
        self.vocab = (
            None
            if config.output_vocab is None
            else torch.tensor(sorted(set(config.output_vocab)), dtype=torch.long, device=config.device)
        )
        if self.vocab is not None:
            self._check_zero_rows()
        self.step = 0
        self.history: list[dict] = []
        self.tokens = 0

    # -- set-up ----------------------------------------------------------------------------------------------------
    def _set_trainable(self) -> None:
        cfg, model = self.config, self.model
        if cfg.lora is not None:
            apply_lora(model, cfg.lora, seed=cfg.seed)
        else:
            model.requires_grad_(True)
            if not cfg.train_vision:
                model.visual.requires_grad_(False)
        model.train()

    def _check_zero_rows(self) -> None:
        """`output_vocab` computes the reference's loss only if every other token's output row is zero."""
        weight = output_weight(self.model)
        outside = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        outside[self.vocab] = False
        if bool(weight.detach()[outside].any()):
            raise ValueError(
                "output_vocab needs the output rows of every other token to be zero, and this checkpoint's are not"
            )

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def micro_batches(self, start: int):
        """(index, list of conversations) from micro-batch `start` on, over the epochs, in the seeded order."""
        n, size = len(self.train_set), self.config.batch_size
        per_epoch = math.ceil(n / size)
        index = start
        while True:
            epoch, k = divmod(index, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
            yield index, [self.train_set[i] for i in order[k * size : (k + 1) * size]]
            index += 1

    def _batch(self, conversations: list, where: str) -> dict:
        examples = [encode(self.processor, c, f"{where}, conversation {i}") for i, c in enumerate(conversations)]
        batch = collate(examples, self.processor.pad_id)
        if self.vocab is not None and self.model.lm_head is None:
            # a tied model's input rows are its output rows: an input outside output_vocab would make its row non-zero
            ids = batch["input_ids"][batch["attention_mask"].bool()]
            outside = sorted(set(ids[~torch.isin(ids, self.vocab.cpu())].tolist()))
            if outside:
                raise ValueError(f"{where}: input tokens {outside[:5]} are outside output_vocab (tied embeddings)")
        return {k: v.to(self.config.device) for k, v in batch.items()}

    # -- the loop --------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        t0 = time.perf_counter()
        batches = self.micro_batches(self.step * cfg.grad_accum)
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="finetune",
            unit="step",
            file=sys.stderr,
            disable=not self.progress,
        )
        loss_value, eval_loss = float("nan"), None
        try:
            while self.step < self.total_steps:
                step_t0 = time.perf_counter()
                micro = [
                    self._batch(convs, f"micro-batch {i}")
                    for i, convs in (next(batches) for _ in range(cfg.grad_accum))
                ]
                num_items = sum(trained_tokens(b["labels"]) for b in micro)
                loss_value = 0.0
                for batch in micro:
                    loss = model_loss(self.model, batch, num_items, self.vocab)
                    loss.backward()
                    loss_value += loss.item()
                if cfg.max_grad_norm is not None:
                    nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                self.tokens += tokens
                record = {"step": self.step, "loss": loss_value, "lr": lr}
                if self.eval_set is not None and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                    eval_loss = record["eval_loss"] = self.evaluate()
                self.history.append(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / (time.perf_counter() - step_t0):.0f}")
                bar.update()
                if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_state(self.output / f"checkpoint-{self.step}")
        finally:
            bar.close()
        if self.eval_set is not None and not (self.history and "eval_loss" in self.history[-1]):
            eval_loss = self.evaluate()
            if self.history:
                self.history[-1]["eval_loss"] = eval_loss
        self.save_final()
        return TrainResult(
            self.step, loss_value, eval_loss, self.tokens, time.perf_counter() - t0, self.output, self.history
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per trained token over the eval data (batches of batch_size, in file order)."""
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        size = self.config.batch_size
        for start in range(0, len(self.eval_set), size):
            batch = self._batch(self.eval_set[start : start + size], f"eval batch {start // size}")
            n = trained_tokens(batch["labels"])
            total += float(model_loss(self.model, batch, num_items=1, vocab=self.vocab))
            count += n
        self.model.train(was_training)
        return total / max(1, count)

    # -- saving and resuming ---------------------------------------------------------------------------------------
    def save_final(self) -> Path:
        if self.config.lora is not None:
            save_adapter(self.model, self.output, str(self.model_path))
        else:
            save_checkpoint(self.model, self.model_path, self.output, dtype=self.model.dtype)
        self._write_state(self.output)
        return self.output

    def save_state(self, directory: Path) -> None:
        """Weights being trained (adapter, or all weights), optimizer, schedule, RNG and position."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.lora is not None:
            save_adapter(self.model, directory, str(self.model_path))
        else:
            from safetensors.torch import save_file

            save_file(
                {n: p.detach().contiguous() for n, p in self.model.named_parameters() if p.requires_grad},
                directory / "trainable.safetensors",
            )
        torch.save(
            {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": torch.random.get_rng_state(),
            },
            directory / "optimizer.pt",
        )
        self._write_state(directory)

    def _write_state(self, directory: Path) -> None:
        config = {
            k: (v if not isinstance(v, torch.dtype) else str(v).removeprefix("torch."))
            for k, v in asdict(self.config).items()
        }
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "history": self.history,
            "config": config,
        }
        (directory / STATE).write_text(json.dumps(state, indent=2))

    def resume(self, directory: str | Path | None = None) -> bool:
        """Continue from `directory`, or the latest DIR/checkpoint-STEP; False when there is none."""
        if directory is None:
            found = sorted(
                self.output.glob("checkpoint-*"),
                key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1,
            )
            if not found:
                return False
            directory = found[-1]
        directory = Path(directory)
        if not (directory / STATE).exists():
            raise ValueError(f"{directory}: not a training checkpoint (no {STATE})")
        state = json.loads((directory / STATE).read_text())
        if self.config.lora is not None:
            set_adapter_weights(self.model, read_adapter(directory)[1])
        else:
            from safetensors.torch import load_file

            weights = load_file(directory / "trainable.safetensors")
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in weights.items():
                    params[name].copy_(t)
        extra = torch.load(directory / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        torch.random.set_rng_state(extra["rng"])
        self.step, self.tokens, self.history = state["step"], state["tokens"], state["history"]
        return True


def finetune(
    model_path,
    data,
    output,
    config: TrainConfig = TrainConfig(),
    eval_data=None,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune the checkpoint at `model_path` on `data` (a JSONL path or a list of conversations); see Trainer."""
    trainer = Trainer(model_path, data, output, config, eval_data, progress)
    if resume and not trainer.resume():
        raise ValueError(f"nothing to resume: {trainer.output} holds no checkpoint-N directory")
    return trainer.train()
