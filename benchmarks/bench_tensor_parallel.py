"""Tensor parallelism on this CPU: peak memory per rank, decode step time and the all-reduce cost per token, at 1, 2
and 3 ranks (Gloo), on a small random checkpoint whose heads split 2 and 3 ways.

    python benchmarks/bench_tensor_parallel.py [--dir /tmp/qwen2vl-tp-small] [--ranks 1 2 3] [--threads 1]

Each world size runs in fresh processes (qwen2vl.parallel.run_ranks; 1 rank = the plain single-process load).
Per rank: peak RSS over the RSS before loading (VmHWM - VmRSS, the loader's and the weights' share) and the bytes of
weights the rank holds. Rank 0: median seconds per decode step (batch 1, greedy, after a 16-token prompt) and the
time of one all-reduce of a decode step's hidden state, times the 2 per layer a token costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qwen2vl.generate.decode import Prompt, generate_steps, greedy  # noqa: E402
from qwen2vl.parallel import load_rank_model, run_ranks  # noqa: E402
from qwen2vl.testing.checkpoint import make_config, write_checkpoint  # noqa: E402
from qwen2vl.weights import load_model  # noqa: E402

# 12 query heads, 6 KV heads, MLP 8832: splits 2 and 3 ways; 2B-like widths, 6 layers, tied embeddings
TEXT = {
    "vocab_size": 151936,
    "hidden_size": 1536,
    "intermediate_size": 8832,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "num_key_value_heads": 6,
    "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}
VISION = {"depth": 2, "embed_dim": 640, "num_heads": 10, "mlp_ratio": 4, "hidden_size": 1536}
NEW_TOKENS = 24


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rank(rank: int, world: int, device: str, ckpt: str, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    base = _status("VmRSS:")
    model = load_model(ckpt, progress=False) if world == 1 else load_rank_model(ckpt)
    peak = _status("VmHWM:") - base
    weights = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    ids = torch.randint(0, 151643, (1, 16), generator=torch.Generator().manual_seed(0))
    prompt = Prompt(ids, torch.ones_like(ids))
    times, t = [], time.perf_counter()
    for _ in generate_steps(model, prompt, greedy, NEW_TOKENS):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    step = statistics.median(times[1:])  # times[0] is the prompt
    reduce_s = 0.0
    if world > 1:
        x = torch.randn(1, 1, model.config.text.hidden_size)
        for _ in range(20):
            dist.all_reduce(x)
        t = time.perf_counter()
        for _ in range(200):
            dist.all_reduce(x)
        reduce_s = (time.perf_counter() - t) / 200
    # the replicated output projection's share of a step, and what a vocab-parallel one would add instead: an
    # all-gather of the logits (vocab / world floats per rank)
    h = torch.randn(1, model.config.text.hidden_size)
    with torch.inference_mode():
        model.logits(h)
        t = time.perf_counter()
        for _ in range(5):
            model.logits(h)
        head_s = (time.perf_counter() - t) / 5
    gather_s = 0.0
    if world > 1:
        part = torch.randn(model.config.text.vocab_size // world)
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        t = time.perf_counter()
        for _ in range(20):
            dist.all_gather(parts, part)
        gather_s = (time.perf_counter() - t) / 20
    mine = {
        "rank": rank,
        "lm_head_ms": 1e3 * head_s,
        "logits_all_gather_ms": 1e3 * gather_s,
        "peak_over_base_MB": peak / 2**20,
        "weights_MB": weights / 2**20,
        "step_ms": 1e3 * step,
        "all_reduce_us": 1e6 * reduce_s,
        "all_reduce_per_token_ms": 1e3 * reduce_s * 2 * model.config.text.num_hidden_layers,
    }
    found = [mine]
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(found))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/qwen2vl-tp-small")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    ckpt = Path(args.dir)
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, make_config(TEXT, VISION), dtype=torch.bfloat16, tokenizer=False)
    for world in args.ranks:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            run_ranks(_rank, world, (str(ckpt), args.threads, f.name), timeout_s=600)
            found = json.loads(Path(f.name).read_text())
        for r in found:
            print(json.dumps({"world": world, **{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}}))


if __name__ == "__main__":
    main()
