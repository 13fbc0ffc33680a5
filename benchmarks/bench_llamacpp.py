"""Side-by-side CPU speed of qwen2vl and llama.cpp on the same random weights, each run in a fresh process.

    python benchmarks/bench_llamacpp.py --llama-bench PATH --gguf-dir DIR [--checkpoint /tmp/qwen2vl-2b-random]
                                        [--rounds 3] [--threads 2] [--ours-int4 DIR] [--json OUT] [--only NAME ...]

llama.cpp side: `llama-bench -p 512 -n 32 -t THREADS -r 1` on the BF16, Q8_0 and Q4_K_M GGUF files in --gguf-dir
(converted from --checkpoint with llama.cpp's convert_hf_to_gguf.py and quantized with llama-quantize; file
names must contain bf16, q8_0 and q4_k_m), giving pp512 (a 512-token prompt processed at once) and tg32 (32
decode steps at batch 1 from an empty context), each after llama-bench's own warm-up run.
Our side: `qwen2vl.load_model` on --checkpoint, bf16 storage (the default CPU path), `quantize="int8"` and
`quantize="int4"` (4-bit round-to-nearest of the decoder), and with --ours-int4 a 4-bit AWQ/GPTQ checkpoint;
pp512 is a 512-token random text prompt's prefill (to the first token), tg32 is 32 decode steps at batch 1 after a
1-token prompt, each after one untimed run of the same kind, on THREADS torch threads.

Every run is its own process; a round runs each variant once, in reverse order every other round, and the table
shows medians over rounds. Per run: peak resident memory (the child's ru_maxrss, from wait4; llama.cpp memory-maps
the GGUF file, so its weights count once their pages are touched), the time from process start to ready (the
model loaded and the first warm-up about to start: llama-bench's `--progress` line, our worker's "ready" line;
both include the program's own start-up), and the read bandwidth probed (as bench_model.py's Bandwidth) just
before and after the run, which gives tg32's fraction of its decode bound (weight bytes read per decode step /
that bandwidth). Ratios compare like storage: bf16 with BF16, int8 with Q8_0, both int4 with Q4_K_M.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPT_TOKENS, GEN_TOKENS = 512, 32  # llama-bench's pp512 and tg32
LLAMA_FORMATS = ("bf16", "q8_0", "q4_k_m")
PAIRS = (
    ("qwen2vl bf16", "llama.cpp bf16"),
    ("qwen2vl int8", "llama.cpp q8_0"),
    ("qwen2vl int4", "llama.cpp q4_k_m"),
    ("qwen2vl int4 ckpt", "llama.cpp q4_k_m"),
)  # like storage with like


@dataclass
class Run:
    """One variant's figures from one process (None where the run failed before producing them)."""

    name: str
    pp: float | None = None  # prompt processing, tokens/s
    tg: float | None = None  # decode at batch 1, tokens/s
    ready_s: float | None = None  # process start -> model loaded
    peak_rss: int | None = None  # bytes
    weight_bytes: int | None = None  # bytes of weights one decode step reads
    bandwidth: float | None = None  # GB/s, mean of the probes before and after
    error: str | None = None
    info: dict = field(default_factory=dict)  # llama-bench's build and CPU strings

    @property
    def bound_fraction(self) -> float | None:
        if self.tg is None or not self.weight_bytes or not self.bandwidth:
            return None
        return self.tg * self.weight_bytes / 1e9 / self.bandwidth


def run_process(cmd: list[str], ready_marker: str, env: dict[str, str]) -> tuple[int, str, str, float | None, int]:
    """Run cmd to completion -> (exit code, stdout, stderr, seconds from start to the first stderr line containing
    ready_marker (None if none), peak resident bytes of the process from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ready: list[float] = []
    err_lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            if not ready and ready_marker in line:
                ready.append(time.perf_counter() - start)
            err_lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    out = proc.stdout.read()
    reader.join()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return proc.returncode, out, "".join(err_lines), (ready[0] if ready else None), usage.ru_maxrss * 1024


def failure(code: int, err: str) -> str:
    tail = [line for line in err.strip().splitlines() if line.strip()][-3:]
    return f"exit code {code}: " + " | ".join(tail)


def llama_run(name: str, bench: str, gguf: Path, threads: int, env: dict[str, str]) -> Run:
    cmd = [
        bench,
        "-m",
        str(gguf),
        "-p",
        str(PROMPT_TOKENS),
        "-n",
        str(GEN_TOKENS),
        "-t",
        str(threads),
        "-r",
        "1",
        "-o",
        "json",
        "--progress",
    ]
    code, out, err, ready, rss = run_process(cmd, "warmup prompt run", env)
    run = Run(name, ready_s=ready, peak_rss=rss)
    if code != 0:
        run.error = failure(code, err)
        return run
    try:
        records = json.loads(out)
    except json.JSONDecodeError:
        run.error = f"llama-bench printed no JSON: {out[:200]!r}"
        return run
    for r in records:
        if (r["n_prompt"], r["n_gen"]) == (PROMPT_TOKENS, 0):
            run.pp = r["avg_ts"]
        elif (r["n_prompt"], r["n_gen"]) == (0, GEN_TOKENS):
            run.tg = r["avg_ts"]
        # tied embeddings: the output projection reads the whole token_embd, so a step reads every tensor
        run.weight_bytes = r["model_size"]
        run.info = {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "n_batch", "n_ubatch")}
    return run


def ours_run(name: str, spec: dict, env: dict[str, str]) -> Run:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    code, out, err, ready, rss = run_process(cmd, "qwen2vl worker: ready", env)
    run = Run(name, ready_s=ready, peak_rss=rss)
    if code != 0:
        run.error = failure(code, err)
        return run
    result = json.loads(out.strip().splitlines()[-1])
    run.pp, run.tg, run.weight_bytes = result["pp"], result["tg"], result["weight_bytes"]
    run.info = {"cpu_choice": result.get("cpu_choice")}
    return run


def worker(spec: dict) -> None:
    """Our side, in its own process: load, say ready, time pp512 and tg32, print one JSON line."""
    import torch

    torch.set_num_threads(spec["threads"])
    from bench_model import Ours, decode_bytes, text_prompt

    side = Ours(spec["checkpoint"], torch.bfloat16, spec["quantize"])
    print("qwen2vl worker: ready", file=sys.stderr, flush=True)
    prompt = text_prompt(1, PROMPT_TOKENS, seed=spec["seed"])
    side.decode_times(prompt, 1)  # warm-up, like llama-bench's warm-up prompt run
    stamps = side.decode_times(prompt, 1)
    pp = PROMPT_TOKENS / (stamps[1] - stamps[0])
    one = text_prompt(1, 1, seed=spec["seed"])
    side.decode_times(one, 2)  # warm-up
    stamps = side.decode_times(one, GEN_TOKENS + 1)  # stamps[1]: first token, after the 1-token prefill
    tg = GEN_TOKENS / (stamps[GEN_TOKENS + 1] - stamps[1])
    lm = getattr(side.model.model, "language_model", side.model.model)
    # decode_bytes counts parameters; quantized layers (qwen2vl.quant) hold their packed weights as buffers
    nbytes = decode_bytes(side.model) + sum(b.numel() * b.element_size() for b in lm.layers.buffers())
    choice = getattr(side.model, "cpu_choice", None)
    print(
        json.dumps(
            {
                "pp": pp,
                "tg": tg,
                "weight_bytes": nbytes,
                "cpu_choice": choice.describe() if choice is not None else None,
            }
        )
    )


def find_gguf(directory: Path, fmt: str) -> Path:
    found = [p for p in sorted(directory.glob("*.gguf")) if fmt in p.name.lower() and not p.name.startswith("mmproj")]
    if len(found) != 1:
        raise SystemExit(
            f"--gguf-dir {directory}: expected exactly one *.gguf whose name contains {fmt!r} (not "
            f"mmproj-*), found {[p.name for p in found] or 'none'}"
        )
    return found[0]


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def summarize(rounds: list[list[Run]], names: list[str]) -> dict[str, dict]:
    table = {}
    for name in names:
        runs = [r for rnd in rounds for r in rnd if r.name == name]
        table[name] = {
            "pp": median([r.pp for r in runs]),
            "tg": median([r.tg for r in runs]),
            "bound": median([r.bound_fraction for r in runs]),
            "ready": median([r.ready_s for r in runs]),
            "rss": median([r.peak_rss / 1e9 if r.peak_rss else None for r in runs]),
            "weights": median([r.weight_bytes / 1e9 if r.weight_bytes else None for r in runs]),
            "bw": median([r.bandwidth for r in runs]),
            "errors": [r.error for r in runs if r.error],
        }
    return table


def ratio(ours: dict, theirs: dict, key: str, lower_better: bool = False) -> str:
    x, y = ours[key], theirs[key]
    if not x or not y:
        return "-"
    return f"{(y / x if lower_better else x / y):.2f}x"


def print_table(table: dict[str, dict], rounds: int) -> None:
    print(f"median of {rounds} round(s); each run a fresh process")
    head = (
        f"{'run':<18}{'pp512 tok/s':>12}{'tg32 tok/s':>12}{'tg32/bound':>12}{'weights GB':>12}"
        f"{'ready s':>10}{'peak RSS GB':>13}{'read GB/s':>11}"
    )
    print(head)
    for name, row in table.items():
        print(
            f"{name:<18}{fmt(row['pp'], '.2f'):>12}{fmt(row['tg'], '.2f'):>12}{fmt(row['bound'], '.0%'):>12}"
            f"{fmt(row['weights'], '.2f'):>12}{fmt(row['ready'], '.1f'):>10}{fmt(row['rss'], '.2f'):>13}"
            f"{fmt(row['bw'], '.1f'):>11}"
        )
        for error in row["errors"]:
            print(f"  {name} failed: {error}")
    print(
        "ready: both sides memory-map their files, so weights kept as stored are read during the warm-up, after "
        "ready; weights quantized at load (ours: int8, int4) are read before it"
    )
    print("ratios, qwen2vl over llama.cpp at like storage (> 1: qwen2vl better; ready time and memory inverted)")
    for ours, theirs in PAIRS:
        a, b = table.get(ours), table.get(theirs)
        if a is not None and b is not None:
            print(
                f"  {ours} / {theirs}: pp512 {ratio(a, b, 'pp')}, tg32 {ratio(a, b, 'tg')}, "
                f"ready {ratio(a, b, 'ready', True)}, peak RSS {ratio(a, b, 'rss', True)}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--llama-bench",
        default=shutil.which("llama-bench"),
        help="path of llama.cpp's llama-bench binary (default: the one on PATH)",
    )
    ap.add_argument("--gguf-dir", type=Path, help="folder with the BF16, Q8_0 and Q4_K_M GGUF files")
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("/tmp/qwen2vl-2b-random"),
        help="the Hugging Face checkpoint the GGUF files were converted from",
    )
    ap.add_argument("--ours-int4", type=Path, help="a 4-bit AWQ/GPTQ checkpoint of the same shapes for our side")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama-bench -t and our torch threads")
    ap.add_argument("--seed", type=int, default=0, help="our random prompts' seed")
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="run only these variants (e.g. 'qwen2vl int4' 'llama.cpp q4_k_m'; default: all)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))

    if not args.llama_bench:
        raise SystemExit(
            "llama-bench not found on PATH: build llama.cpp's tools (docs/benchmarks.md) and pass --llama-bench PATH"
        )
    bench = Path(args.llama_bench)
    if not (bench.is_file() and os.access(bench, os.X_OK)):
        raise SystemExit(f"--llama-bench {bench}: no executable file there (build llama.cpp's llama-bench first)")
    if args.gguf_dir is None or not args.gguf_dir.is_dir():
        raise SystemExit(f"--gguf-dir {args.gguf_dir}: not a folder (it must hold the converted GGUF files)")
    for path in [args.checkpoint] + ([args.ours_int4] if args.ours_int4 else []):
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path}: no config.json there (a Hugging Face checkpoint folder is needed)")
    if args.rounds < 1 or args.threads < 1:
        raise SystemExit("--rounds and --threads must be at least 1")
    ggufs = {f: find_gguf(args.gguf_dir, f) for f in LLAMA_FORMATS}

    import torch
    from bench_model import Bandwidth

    from qwen2vl import machine

    torch.set_num_threads(args.threads)  # the probe reads with as many threads as the runs
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    spec = {"checkpoint": str(args.checkpoint), "threads": args.threads, "seed": args.seed}
    variants = {
        f"llama.cpp {f}": (lambda f=f, n=f"llama.cpp {f}": llama_run(n, str(bench), ggufs[f], args.threads, env))
        for f in LLAMA_FORMATS
    }
    variants["qwen2vl bf16"] = lambda: ours_run("qwen2vl bf16", {**spec, "quantize": None}, env)
    variants["qwen2vl int8"] = lambda: ours_run("qwen2vl int8", {**spec, "quantize": "int8"}, env)
    variants["qwen2vl int4"] = lambda: ours_run("qwen2vl int4", {**spec, "quantize": "int4"}, env)
    if args.ours_int4:
        variants["qwen2vl int4 ckpt"] = lambda: ours_run(
            "qwen2vl int4 ckpt", {**spec, "quantize": None, "checkpoint": str(args.ours_int4)}, env
        )

    if args.only:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            raise SystemExit(f"--only: no variant named {unknown}; choose from {sorted(variants)}")
        variants = {name: run for name, run in variants.items() if name in args.only}

    print(f"CPU: {machine.cpu_facts().summary()}")
    print(
        f"torch {torch.__version__}, {args.threads} threads; llama-bench {bench}; GGUF: "
        + ", ".join(p.name for p in ggufs.values())
    )
    bandwidth = Bandwidth(torch.device("cpu"))
    names = list(variants)
    rounds: list[list[Run]] = []
    for i in range(args.rounds):
        order = names if i % 2 == 0 else names[::-1]
        runs = []
        for name in order:
            before = bandwidth()
            run = variants[name]()
            run.bandwidth = (before + bandwidth()) / 2
            print(
                f"round {i + 1}/{args.rounds} {name}: pp512 {fmt(run.pp, '.2f')} tok/s, tg32 {fmt(run.tg, '.2f')} "
                f"tok/s, ready {fmt(run.ready_s, '.1f')} s, peak RSS {run.peak_rss / 1e9:.2f} GB, "
                f"read {run.bandwidth:.1f} GB/s" + (f"; FAILED {run.error}" if run.error else ""),
                flush=True,
            )
            runs.append(run)
        rounds.append(runs)
    llama_info = next((r.info for rnd in rounds for r in rnd if r.name.startswith("llama.cpp") and r.info), {})
    ours_info = next((r.info for rnd in rounds for r in rnd if r.name.startswith("qwen2vl") and r.info), {})
    if llama_info:
        print(
            f"llama.cpp build {llama_info.get('build_commit')} ({llama_info.get('build_number')}), cpu_info "
            f"{llama_info.get('cpu_info')!r}, n_batch {llama_info.get('n_batch')}, "
            f"n_ubatch {llama_info.get('n_ubatch')}"
        )
    if ours_info.get("cpu_choice"):
        print(f"qwen2vl: {ours_info['cpu_choice']}")
    table = summarize(rounds, names)
    print_table(table, args.rounds)
    if args.json:
        args.json.write_text(
            json.dumps({"rounds": [[asdict(r) for r in rnd] for rnd in rounds], "median": table}, indent=1)
        )


if __name__ == "__main__":
    sys.exit(main())
