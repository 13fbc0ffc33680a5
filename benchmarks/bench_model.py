"""Side-by-side speed of qwen2vl and transformers on the same random weights, in one process.

    python benchmarks/bench_model.py [--dir /tmp/qwen2vl-2b-random] [--dtype bfloat16] [--repeats 3] [--rounds 1]
                                     [--decode-only] [--only qwen2vl|transformers] [--quantize int8] [--device cuda]

Builds (once) a random checkpoint with the real Qwen2-VL-2B shapes, loads it with both libraries and measures,
median of `--repeats`: vision encode of a 448x448 image (grid 1x32x32) and of a 1024x683 photo (resized to
672x1036, grid 1x48x74); time to first token for one 448x448 image and a short prompt (281 tokens); decode
tokens/s at batch 1 and 4; the decode bound (bytes of weights read per token / read bandwidth measured just
before and after each decode run) and each side's fraction of it; peak resident memory of each side. Prints a
table with the ratios (ours vs reference). `--rounds N` loads and measures both sides N times, alternating which goes
first, and prints medians over the rounds with each ratio's spread: on a machine whose speed drifts over minutes
(shared cloud cores), one round's sides can meet different machines.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import median_time

VS, VE, IMG = 151652, 151653, 151655
PROMPT_TOKENS = 512  # text-only prompt for the prompt-processing rate (llama-bench's pp512)


def bf16_matmul_rate() -> float:
    """GFLOP/s of torch's bf16 GEMM on a vision-shaped product (1024 patches x 1280 -> 5120), median of 5: the rate
    the vision tower's products can reach on this CPU."""
    x, w = torch.randn(1024, 1280).to(torch.bfloat16), torch.randn(5120, 1280).to(torch.bfloat16)
    return 2 * 1024 * 1280 * 5120 / median_time(lambda: torch.nn.functional.linear(x, w), 5, warmup=True) / 1e9


def vision_flops(config, grid: tuple[int, int, int]) -> float:
    """Matrix-product and attention FLOPs of one vision encode of `grid` (a Qwen2VLConfig's shapes; both sides)."""
    cfg = config.vision
    e, n = cfg.embed_dim, grid[0] * grid[1] * grid[2]
    length = grid[1] * grid[2]
    per_block = n * (8 * e * e + 4 * e * cfg.mlp_dim) + grid[0] * 4 * length * length * e
    merger = n // 4 * (2 * cfg.merge_dim * cfg.merge_dim + 2 * cfg.merge_dim * config.text.hidden_size)
    return cfg.depth * per_block + 2 * n * cfg.patch_dim * e + merger


def rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def image_prompt(grid: tuple[int, int, int], text_tokens: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    ids = [151644, 872, 198, VS] + [IMG] * (t * h * w // 4) + [VE]
    ids += torch.randint(0, 151643, (max(1, text_tokens - len(ids)),), generator=g).tolist()
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
        "pixel_values": torch.randn(t * h * w, 1176, generator=g),
        "image_grid_thw": torch.tensor([grid]),
    }


def text_prompt(batch: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 151643, (batch, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class Bandwidth:
    """Read bandwidth probe: GB/s of summing a 512 MB float32 array (one add per 4 bytes, so memory-bound), median
    of 5. The array is allocated once, before either side loads, so it does not count in their peak memory. This
    machine's bandwidth drifts by a third within minutes (other tenants), so decoding is bracketed by probes."""

    def __init__(self, device: torch.device) -> None:
        self.data, self.device = torch.ones(2**27, dtype=torch.float32, device=device), device

    def _sum(self) -> None:
        self.data.sum()
        sync(self.device)

    def __call__(self) -> float:
        return self.data.numel() * 4 / median_time(self._sum, 5, warmup=self.device.type == "cuda") / 1e9


def decode_bytes(model) -> int:
    """Bytes of weights one decode step must read: every decoder layer, the final norm and the output projection
    (the embedding lookup reads one row). Works for both sides (transformers nests the decoder one level deeper)."""
    lm = getattr(model.model, "language_model", model.model)
    tensors = list(lm.layers.parameters()) + list(lm.norm.parameters())
    head = model.lm_head.weight if model.lm_head is not None else lm.embed_tokens.weight
    tensors += [head] + ([model.lm_head.scale] if getattr(model.lm_head, "scale", None) is not None else [])
    return sum(t.numel() * t.element_size() for t in tensors)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timestamp means the work before it is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Ours:
    name = "qwen2vl"

    def __init__(self, path, dtype, quantize=None, device="cpu", cpu_matmul="auto", mmap=True):
        import qwen2vl
        from qwen2vl.generate.decode import Prompt, generate_steps, greedy

        self.device = torch.device(device)
        self.model = qwen2vl.load_model(
            path,
            dtype=dtype,
            device=self.device,
            progress=False,
            quantize=quantize,
            cpu_matmul=cpu_matmul,
            mmap=mmap,
        )
        if getattr(self.model, "cpu_choice", None) is not None:
            print(f"qwen2vl: {self.model.cpu_choice.describe()}")
        self._prompt, self._steps, self._greedy = Prompt, generate_steps, greedy

    def vision(self, batch):
        with torch.inference_mode():
            self.model.encode_vision(batch["pixel_values"], batch["image_grid_thw"])
        sync(self.device)

    def decode_times(self, batch, new):
        stamps = [time.perf_counter()]
        for _ in self._steps(self.model, self._prompt.from_batch(batch), self._greedy, new):
            sync(self.device)
            stamps.append(time.perf_counter())
        return stamps


class Reference:
    name = "transformers"

    def __init__(self, path, dtype, quantize=None, device="cpu"):
        import transformers

        self.device = torch.device(device)
        self.model = (
            transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
            .to(self.device)
            .eval()
        )
        self._lp = transformers.LogitsProcessor

    def vision(self, batch):
        with torch.inference_mode():
            pixels, grid = batch["pixel_values"].to(self.device), batch["image_grid_thw"].to(self.device)
            self.model.model.visual(pixels, grid_thw=grid)
        sync(self.device)

    def decode_times(self, batch, new):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        stamps = [time.perf_counter()]
        device = self.device

        class Stamp(self._lp):
            def __call__(self, input_ids, scores):
                sync(device)
                stamps.append(time.perf_counter())
                return scores

        with torch.inference_mode():
            self.model.generate(
                **batch,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                top_k=None,
                top_p=None,
                temperature=None,
                repetition_penalty=1.0,
                pad_token_id=151643,
                logits_processor=[Stamp()],
            )
        return stamps


def decode_run(side, batch: int, new_tokens: int, bandwidth, weight_bytes: int) -> tuple[float, float, float]:
    """One decode run bracketed by bandwidth probes -> (tokens/s over the decode steps, prefill excluded; that
    rate over the bound at the bandwidth measured around the run; that bandwidth in GB/s)."""
    before = bandwidth()
    s = side.decode_times(text_prompt(batch, 32), new_tokens)
    bw = (before + bandwidth()) / 2
    rate = batch / statistics.median(s[i + 1] - s[i] for i in range(1, len(s) - 1))
    return rate, rate * weight_bytes / 1e9 / bw, bw


def run_side(side, repeats, new_tokens, bandwidth, weight_bytes, decode_only=False):
    r = {}
    if not decode_only:
        small, photo = image_prompt((1, 32, 32), 281), image_prompt((1, 48, 74), 281)
        side.vision(image_prompt((1, 4, 4), 20))  # warm-up
        r["vision 448x448 (s)"] = median_time(lambda: side.vision(small), repeats)
        r["vision 1024x683 (s)"] = median_time(lambda: side.vision(photo), repeats)
        ttft = []
        for _ in range(repeats):
            stamps = side.decode_times(small, 1)
            ttft.append(stamps[1] - stamps[0])
        r["TTFT 448x448 + text, 281 tok (s)"] = statistics.median(ttft)
        prompt = text_prompt(1, PROMPT_TOKENS)
        r[f"prompt processing, {PROMPT_TOKENS} tok (tok/s)"] = statistics.median(
            PROMPT_TOKENS / (s[1] - s[0]) for s in (side.decode_times(prompt, 1) for _ in range(repeats))
        )
    else:
        side.decode_times(text_prompt(1, 32), 2)  # warm-up
    bws = []
    for b in (1, 4):
        runs = [decode_run(side, b, new_tokens, bandwidth, weight_bytes) for _ in range(repeats)]
        r[f"decode batch {b} (tok/s)"] = statistics.median(rate for rate, _, _ in runs)
        if b == 1:
            r["decode batch 1: fraction of bound"] = statistics.median(f for _, f, _ in runs)
            bws = [bw for _, _, bw in runs]
    r["_bw"] = statistics.median(bws)
    return r


def ratio(key: str, ours: float, theirs: float) -> float:
    """How many times better ours is: for times and memory the lower wins, for rates the higher."""
    return theirs / ours if "(s)" in key or "memory" in key else ours / theirs


def measure_side(cls, args, path, dtype, dtypes, device, bandwidth) -> dict:
    """Load one side, measure it (run_side), note its peak memory above the start and its bytes per decode token
    ("_bytes"), and let it go."""
    rss_peak_reset()
    base = status("VmRSS:")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    side = (
        Ours(str(path), dtype, args.quantize, device, args.cpu_matmul)
        if cls is Ours
        else cls(str(path), dtypes[cls.name], args.quantize, device)
    )
    nbytes = decode_bytes(side.model)
    r = run_side(side, args.repeats, args.new_tokens, bandwidth, nbytes, args.decode_only)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else status("VmHWM:")
    r["peak memory above start (GB)"] = (peak - base) / 1e9
    r["_bytes"] = nbytes
    del side
    gc.collect()
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="our weights' dtype")
    ap.add_argument(
        "--reference-dtype",
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="transformers' dtype; auto: its faster one on this CPU (bf16 where the CPU has bf16 matrix "
        "instructions and a timed 2B-shaped product says so, else float32)",
    )
    ap.add_argument("--cpu-matmul", default="auto", choices=["auto", "float32", "bf16"], help="our many-row path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="load and measure both sides this many times, alternating which goes first; figures are medians over "
        "the rounds (on a machine whose speed drifts, a round's sides are minutes apart, rounds interleave them)",
    )
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--only", choices=["qwen2vl", "transformers"])
    ap.add_argument("--quantize", choices=["int8"], help="load our side with weight-only int8")
    ap.add_argument("--decode-only", action="store_true", help="skip vision encode and time to first token")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on CUDA peak memory is torch's allocator peak")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = Path(args.dir)
    if not (path / "config.json").exists():
        from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config, write_checkpoint

        write_checkpoint(path, make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION), dtype=torch.bfloat16, tokenizer=False)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    from qwen2vl import machine

    print(f"CPU: {machine.cpu_facts().summary()}")
    ref_dtype = args.reference_dtype
    if ref_dtype == "auto":
        ref_dtype = "bfloat16" if machine.choose([(8960, 1536)]).matmul == "bf16" else "float32"
    dtypes = {"qwen2vl": dtype, "transformers": getattr(torch, ref_dtype)}
    bandwidth = Bandwidth(device)
    rounds: dict[str, list[dict]] = {}
    bytes_per_token = {}
    sides = [cls for cls in (Ours, Reference) if not args.only or cls.name == args.only]
    for k in range(args.rounds):
        for cls in sides if k % 2 == 0 else sides[::-1]:
            rounds.setdefault(cls.name, []).append(measure_side(cls, args, path, dtype, dtypes, device, bandwidth))
            bytes_per_token[cls.name] = rounds[cls.name][-1].pop("_bytes")
    # each figure: the median over the rounds; a ratio's spread over the rounds is printed beside it
    results = {n: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for n, rs in rounds.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__}, {where}, our weights {args.dtype}, transformers in {ref_dtype}, "
        f"median of {args.repeats}"
        + (f" in each of {args.rounds} rounds, median over the rounds" if args.rounds > 1 else "")
    )
    names = list(results)
    print(f"{'':<36}" + "".join(f"{n:>14}" for n in names) + ("      ratio" if len(names) == 2 else ""))
    bws = {n: results[n].pop("_bw") for n in names}
    for key in results[names[0]]:
        vals = [results[n][key] for n in names]
        line = f"{key:<36}" + "".join(f"{v:>14.3f}" for v in vals)
        if len(names) == 2:
            line += f"{ratio(key, *vals):>10.2f}x"
            if args.rounds > 1:
                each = sorted(ratio(key, a[key], b[key]) for a, b in zip(*rounds.values()))
                line += f"  (rounds {each[0]:.2f}-{each[-1]:.2f}x)"
        print(line)
    if device.type == "cpu" and not args.decode_only:
        from qwen2vl.config import Qwen2VLConfig

        rate, flops = bf16_matmul_rate(), vision_flops(Qwen2VLConfig.from_file(path / "config.json"), (1, 32, 32))
        print(
            f"torch bf16 GEMM on this CPU: {rate:.0f} GFLOP/s; vision 448x448 = {flops / 1e9:.0f} GFLOP, so "
            + ", ".join(f"{n} reaches {flops / results[n]['vision 448x448 (s)'] / 1e9 / rate:.0%} of it" for n in names)
        )
    for n in names:
        nbytes, bw = bytes_per_token[n], bws[n]
        print(
            f"decode bound, {n}: {nbytes / 1e9:.2f} GB of weights read per token; read bandwidth around its batch-1 "
            f"runs {bw:.1f} GB/s (median) = {bw / (nbytes / 1e9):.2f} tok/s; batch 1 reached "
            f"{100 * results[n]['decode batch 1: fraction of bound']:.0f}% of it (median of per-run fractions)"
        )


if __name__ == "__main__":
    sys.exit(main())
