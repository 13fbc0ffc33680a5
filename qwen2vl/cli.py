"""The `qwen2vl` command: run, chat, plan, serve, make-tiny. Each subcommand is a thin layer over the library;
answers go to stdout and nothing else does (progress, logs and timings go to stderr)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {"auto": None, "bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


def _dtype(name: str):
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. Qwen/Qwen2-VL-2B-Instruct)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weight dtype (auto: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 for the language model (CPU)")


def _media_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", default=[], help="image path or URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path or URL (repeatable)")
    p.add_argument("--min-pixels", type=int, help="per-image lower pixel bound of the first (qwen-vl-utils) resize "
                                                  "(default 3136); the checkpoint's bounds then apply")
    p.add_argument("--max-pixels", type=int, help="per-image upper pixel bound of the first (qwen-vl-utils) resize "
                                                  "(default 12845056); the checkpoint's bounds then apply")
    p.add_argument("--fps", type=float, help="video frames sampled per second (default 2)")
    p.add_argument("--nframes", type=int, help="video frames to sample (instead of --fps)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the checkpoint's generation_config)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)


def _sampling(a) -> dict:
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
            "repetition_penalty": a.repetition_penalty, "seed": a.seed}


def _content(a, prompt: str | None) -> list[dict]:
    parts = []
    for img in a.image:
        item = {"type": "image", "image": img}
        for key in ("min_pixels", "max_pixels"):
            if getattr(a, key) is not None:
                item[key] = getattr(a, key)
        parts.append(item)
    for vid in a.video:
        item = {"type": "video", "video": vid}
        if a.fps is not None:
            item["fps"] = a.fps
        if a.nframes is not None:
            item["nframes"] = a.nframes
        parts.append(item)
    if prompt:
        parts.append({"type": "text", "text": prompt})
    return parts


def _load(a):
    from .pipeline import load

    return load(a.model, dtype=_dtype(a.dtype), device=a.device, quantize=a.quantize)


def cmd_run(a) -> int:
    pipe = _load(a)
    conversation = [{"role": "user", "content": _content(a, a.prompt)}]
    if a.draw_boxes:
        text, boxes = pipe.ground(conversation, **_sampling(a))
        from .grounding import draw_boxes
        from .processing.chat import normalize_part
        from .processing.media import load_image

        print(text)
        if not a.image:
            print("--draw-boxes needs an --image", file=sys.stderr)
            return 2
        image = load_image(normalize_part({"type": "image", "image": a.image[-1]}, "image")["image"],
                           pipe.processor.policy)
        draw_boxes(image, boxes, a.draw_boxes)
        for b in boxes:
            print(json.dumps({"label": b.label, "pixels": [list(p) for p in b.pixels]}), file=sys.stderr)
    else:
        for piece in pipe.stream(conversation, **_sampling(a)):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if a.verbose:
        t = pipe.last_timings
        t.load_s = pipe.load_s
        print(t.report(), file=sys.stderr)
    return 0


CHAT_HELP = "commands: /image PATH, /video PATH (attach to your next message), /reset, /quit"


def cmd_chat(a) -> int:
    from .pipeline import ChatSession

    pipe = _load(a)
    session = ChatSession(pipe)
    pending: list[dict] = []
    print(CHAT_HELP, file=sys.stderr)
    for line in sys.stdin:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/reset":
                session.reset()
                pending = []
            elif cmd in ("/image", "/video") and arg.strip():
                kind = cmd[1:]
                pending.append({"type": kind, kind: arg.strip()})
            else:
                print(CHAT_HELP, file=sys.stderr)
            continue
        content = pending + [{"type": "text", "text": line}]
        pending = []
        try:
            for piece in session.send(content, **_sampling(a)):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ValueError as e:  # bad input: say so and keep the session
            session.messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        if a.verbose:
            print(pipe.last_timings.report(), file=sys.stderr)
    return 0


def cmd_plan(a) -> int:
    from .hub import resolve_model_path
    from .processing import Processor

    proc = Processor.from_pretrained(resolve_model_path(a.model))
    plan = proc.plan([{"role": "user", "content": _content(a, a.prompt)}])
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
    print(f"prompt tokens: {plan.prompt_tokens} of a {plan.context}-token context")
    return 0 if plan.prompt_tokens <= plan.context else 1


def cmd_make_tiny(a) -> int:
    from .testing.checkpoint import make_config, write_checkpoint

    out = write_checkpoint(Path(a.directory), make_config(), seed=a.seed)
    print(out)
    return 0


def cmd_serve(a) -> int:
    from .serve.server import main as serve_main

    return serve_main(a)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
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
    from .serve.limits import Limits

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
    p.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl", description="Qwen2-VL: run, chat, plan, serve.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="answer one prompt about images/videos, streamed to stdout")
    _model_args(p), _media_args(p), _sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--draw-boxes", metavar="OUT.png", help="parse grounding boxes and draw them on the last image")
    p.add_argument("--verbose", action="store_true", help="timing breakdown to stderr")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="multi-turn terminal chat (/image, /video, /reset)")
    _model_args(p), _sampling_args(p)
    p.add_argument("--verbose", action="store_true", help="timings of each turn to stderr")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("plan", help="token budget of a prompt's images and videos, without running the model")
    p.add_argument("--model", required=True)
    _media_args(p)
    p.add_argument("--prompt", default="")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint (real vocabulary) for offline trials")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input or a missing model: one clear line, no traceback
        print(f"qwen2vl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
