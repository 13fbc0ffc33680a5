"""Training speed and memory of qwen2vl against transformers + PEFT doing the same steps on the same weights.

    python benchmarks/bench_train.py [--shapes tiny|2b] [--dir DIR] [--mode lora full] [--steps 4]
                                     [--tokens 384] [--device cpu|cuda]

Builds (once) a random float32 checkpoint (`--shapes 2b`: the real Qwen2-VL-2B shapes; tiny: the tests' odd
sizes), then runs each side in its own process, so that each one's peak memory is its own: one 448x448 image
(grid 1x32x32, 256 tokens) and random text up to `--tokens` tokens, labels on the last 64, AdamW (lr 1e-5),
`--steps` optimizer steps after one untimed step. LoRA: r=8, alpha=16 on the seven decoder projections, on both
sides; full: all weights but the vision tower. Prints per side and mode: median step time, tokens/s (input tokens
per second of training), peak memory (resident set on CPU, torch's max allocated on CUDA), and the first step's
loss (equal on both sides: the same maths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VS, VE, IMG = 151652, 151653, 151655
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = 1, 32, 32
    ids = [151644, 872, 198, VS] + [IMG] * (t * h * w // 4) + [VE]
    ids += torch.randint(0, 151643, (max(65, tokens - len(ids)),), generator=g).tolist()
    labels = [-100] * (len(ids) - 64) + ids[-64:]
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(t * h * w, 1176, generator=g),
        "image_grid_thw": torch.tensor([[t, h, w]]),
        "labels": torch.tensor([labels]),
    }


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def run_side(side: str, mode: str, directory: str, steps: int, tokens: int, device: str) -> dict:
    dev = torch.device(device)
    data = {k: v.to(dev) for k, v in batch(tokens).items()}
    if side == "qwen2vl":
        from qwen2vl.train import LoRAConfig, apply_lora, causal_lm_loss
        from qwen2vl.weights import load_model

        model = load_model(directory, dtype=torch.float32, device=dev, progress=False, cpu_kernels=False)
        if mode == "lora":
            apply_lora(model, LoRAConfig(r=8, alpha=16.0, target_modules=tuple(TARGETS)), seed=0)
        else:
            model.requires_grad_(True)
            model.visual.requires_grad_(False)
        inputs = {k: v for k, v in data.items() if k != "labels"}

        def loss_fn():
            return causal_lm_loss(model(**inputs), data["labels"])
    else:
        import transformers

        model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="sdpa"
        ).to(dev)
        if mode == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        else:
            model.requires_grad_(True)
            model.model.visual.requires_grad_(False)

        def loss_fn():
            return model(**data).loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    times, first = [], None
    for step in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            first = loss.item()
        else:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    n = int(data["attention_mask"].sum())
    return {
        "side": side,
        "mode": mode,
        "step_s": step_s,
        "tokens_per_s": n / step_s,
        "peak_gib": peak_bytes(dev) / 2**30,
        "first_loss": first,
        "trainable": sum(p.numel() for p in params),
        "tokens": n,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", choices=("tiny", "2b"), default="tiny")
    ap.add_argument("--dir", help="checkpoint directory (default: /tmp/qwen2vl-train-bench-SHAPES)")
    ap.add_argument("--mode", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # internal: run one side in this process, print JSON
    a = ap.parse_args()
    directory = a.dir or f"/tmp/qwen2vl-train-bench-{a.shapes}"
    if a.side:
        print(json.dumps(run_side(a.side, a.mode[0], directory, a.steps, a.tokens, a.device)))
        return
    if not (Path(directory) / "config.json").exists():
        from qwen2vl.testing.checkpoint import (
            SHAPES_2B_TEXT,
            SHAPES_2B_VISION,
            make_config,
            write_checkpoint,
        )

        cfg = make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION) if a.shapes == "2b" else make_config()
        write_checkpoint(directory, cfg, seed=0, tokenizer=False)
    rows = []
    for mode in a.mode:
        for side in ("qwen2vl", "transformers"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--side",
                    side,
                    "--mode",
                    mode,
                    "--dir",
                    directory,
                    "--steps",
                    str(a.steps),
                    "--tokens",
                    str(a.tokens),
                    "--device",
                    a.device,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{'mode':<5} {'side':<13} {'tokens':>6} {'trainable':>12} {'step s':>8} {'tokens/s':>9} {'peak GiB':>9} "
        f"{'first loss':>11}"
    )
    for r in rows:
        print(
            f"{r['mode']:<5} {r['side']:<13} {r['tokens']:>6} {r['trainable']:>12,} {r['step_s']:>8.3f} "
            f"{r['tokens_per_s']:>9.0f} {r['peak_gib']:>9.2f} {r['first_loss']:>11.6f}"
        )


if __name__ == "__main__":
    main()
