"""What `qwen2vl serve` is configured with: one typed record, built from the command line or directly (tests,
benchmarks, embedding the server). Torch-free, so the CLI's help can show these defaults without loading torch."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

from .limits import Limits


@dataclass(frozen=True)
class ServerConfig:
    model: str  # checkpoint directory or hub id
    dtype: str = "auto"  # "auto" (the checkpoint's), "bfloat16", "float32", "float16"
    device: str = "cpu"
    quantize: str | None = None  # "int8": weight-only int8 language model, CPU only
    cpu_matmul: str = "auto"  # "auto", "float32" or "bf16" (qwen2vl.machine)
    mmap: bool = True  # weights memory-mapped from the checkpoint (False: read into memory; --no-mmap)
    adapter: str | None = None  # a LoRA adapter directory in PEFT's format, applied at load (qwen2vl.lora)
    tensor_parallel_size: int = 1  # >1: this process is one rank of a process group of that many (qwen2vl.parallel)
    shard_vision: bool = False  # with tensor_parallel_size > 1: the vision tower split over the ranks too
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, adapter directory): requests choose one by `model`
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as 'Authorization: Bearer KEY' when set
    served_model_name: str | None = None  # the name clients use; default: `model`
    max_model_len: int = 8192  # context per request (prompt + output)
    max_num_seqs: int = 16  # requests decoded together at most
    kv_cache_memory: str = "2GiB"  # bytes with a unit, or a fraction of free memory ("0.3")
    max_waiting: int = 256  # queued requests before 429
    prefill_chunk: int = 256  # prompt tokens per engine step
    allowed_local_media_path: str | None = None  # directory file:// media may come from; None: no local files
    allowed_media_domains: tuple[str, ...] | None = None  # hosts URL media may come from; None: any public host
    max_request_bytes: int = 64 * 2**20  # largest request body (413 beyond)
    limits: Limits = field(default_factory=Limits)  # per-request media limits (qwen2vl.serve.limits)
    header_timeout: float = 10.0  # seconds a client may take to send its headers
    body_timeout: float = 30.0  # seconds a client may take to send its body
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (CORS); "*" for any
    verbose: bool = False

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerConfig:
        """From `qwen2vl serve`'s parsed flags (the flag names are the field names; the limits' flags too)."""
        given = vars(args)
        limits = Limits(**{f.name: given[f.name] for f in fields(Limits) if f.name in given})
        values = {f.name: given[f.name] for f in fields(cls) if f.name in given and f.name != "limits"}
        if values.get("allowed_media_domains") is not None:
            values["allowed_media_domains"] = tuple(values["allowed_media_domains"])
        values["allowed_origins"] = tuple(values.get("allowed_origins") or ())
        values["lora_modules"] = tuple(values.get("lora_modules") or ())
        return cls(**values, limits=limits)
