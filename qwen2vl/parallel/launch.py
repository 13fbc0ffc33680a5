"""One process per tensor-parallel rank: start them, join them, and turn a failed rank into one clear error.

torch.multiprocessing (spawn) starts the ranks; each initialises the default torch.distributed process group
over TCP on this host (Gloo on CPU, NCCL on CUDA) with a collective timeout, so a rank that hangs makes the
others fail instead of waiting for ever, and a rank that dies stops the rest (torch's ProcessContext.join).
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..weights import load_model
from . import commands
from .shard import shard_decoder
from .shard import shard_vision as shard_vision_blocks

# a collective that waits longer fails. Generous, because ranks load at different speeds before their first
# all-reduce (a 72B shard from a slow disk); a rank that dies is noticed at once by the join, not by this.
DEFAULT_TIMEOUT_S = 1800.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed, died or timed out."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(
    fn: Callable,
    world: int,
    args: tuple = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    lead: bool = False,
) -> None:
    """Run fn(rank, world, device, *args) in `world` ranks, each inside the default process group; return when
    all have. `fn` must be importable (a module-level function). On CUDA, rank r uses cuda:r and NCCL.

    `lead`: this process is rank 0 (it keeps the terminal, stdin and signals: chat and serve need them) and
    starts ranks 1..world-1; a watchdog sends it SIGINT when one of them dies, so that rank 0 stops even while
    it waits for input or serves no request. Otherwise every rank is a fresh process (tests, benchmarks)."""
    port = free_port()
    first = 1 if lead else 0
    ctx = mp.start_processes(
        _child_main,
        args=(fn, world, port, device, timeout_s, args, first),
        nprocs=world - first,
        join=False,
        start_method="spawn",
    )
    if lead:
        own: BaseException | None = None
        watchdog = _Watchdog(ctx)
        try:
            try:
                _in_group(0, fn, world, port, device, timeout_s, args)
            finally:
                watchdog.stop()
        except BaseException as e:  # noqa: BLE001 (reported with the other ranks' failures below)
            own = e
        if own is not None:
            if isinstance(own, KeyboardInterrupt) and not watchdog.fired:  # Ctrl-C: stop, say nothing more
                _stop(ctx)
                raise own
            deadline = time.monotonic() + 5.0  # the others get 5 s to fail on their own (their group is gone)
            for process in ctx.processes:
                process.join(max(0.0, deadline - time.monotonic()))
            _stop(ctx)
            raise TensorParallelError(_failures(ctx, world, first, own)) from None
    try:
        while not ctx.join(grace_period=5.0):  # a failed rank: the others get 5 s to fail on their own
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        raise TensorParallelError(_failures(ctx, world, first)) from None
    except BaseException:
        _stop(ctx)
        raise


class _Watchdog:
    """Polls the started ranks; when one has died or failed, sends SIGINT to this process's main thread once."""

    def __init__(self, ctx) -> None:
        self.ctx, self.fired, self._done = ctx, False, threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qwen2vl-rank-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            if any(p.exitcode not in (None, 0) for p in self.ctx.processes):
                self.fired = True
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _stop(ctx) -> None:
    for process in ctx.processes:
        if process.is_alive():
            process.terminate()
    for process in ctx.processes:
        process.join(5.0)


# words of a rank's error that make it a consequence of another rank's failure (a broken collective)
_CONSEQUENCE = ("gloo", "nccl", "connection", "timed out", "timeout", "keyboardinterrupt")


def _failures(ctx, world: int, first: int = 0, own: BaseException | None = None) -> str:
    """One line: every rank that died or raised, causes first (a death, then errors other than broken
    collectives; the broken collectives only when no cause is known), each with the last line of its error.
    `own`: rank 0's error when it ran in this process."""
    found = []
    if own is not None:
        last = traceback.format_exception_only(type(own), own)[-1].strip() or type(own).__name__
        found.append((1 + any(w in last.lower() for w in _CONSEQUENCE), f"rank 0 of {world} failed: {last}"))
    for index, (process, error_file) in enumerate(zip(ctx.processes, ctx.error_files)):
        rank, code = index + first, process.exitcode
        if os.path.exists(error_file) and os.path.getsize(error_file):
            with open(error_file, "rb") as f:
                last = [line for line in pickle.load(f).splitlines() if line.strip()][-1]
            found.append((1 + any(w in last.lower() for w in _CONSEQUENCE), f"rank {rank} of {world} failed: {last}"))
        elif code not in (0, None, -signal.SIGTERM):  # SIGTERM: stopped by join after another rank's failure
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            found.append((0, f"rank {rank} of {world} died ({how})"))
    if not found:
        found = [(0, f"a rank of {world} was stopped by SIGTERM")]
    if any(kind < 2 for kind, _ in found):  # a cause is known: the broken collectives it caused say nothing more
        found = [f for f in found if f[0] < 2]
    return (
        "tensor-parallel "
        + "; ".join(text for _, text in sorted(found, key=lambda f: f[0]))
        + "; the other ranks were stopped"
    )


def _child_main(
    index: int, fn: Callable, world: int, port: int, device: str, timeout_s: float, args: tuple, first: int
) -> None:
    if first:  # rank 0 (the parent) decides when to stop: Ctrl-C there, not here
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _in_group(index + first, fn, world, port, device, timeout_s, args)


def _in_group(rank: int, fn: Callable, world: int, port: int, device: str, timeout_s: float, args: tuple) -> None:
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    threads = torch.get_num_threads()
    if not cuda:  # the ranks share this host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        fn(rank, world, device, *args)
    finally:
        torch.set_num_threads(threads)
        commands.forget()
        dist.destroy_process_group()


def join_launcher_group(world: int, device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, str]:
    """Under torchrun (one host or several): this process is one rank; initialise the default process group from
    torchrun's environment (env://). Returns (rank, this rank's device: cuda:LOCAL_RANK on CUDA)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise ValueError(f"--tensor-parallel-size {world}, but torchrun started {launched} processes")
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), device


def require_group(world: int) -> None:
    """Refuse a tensor-parallel load outside a process group of `world` ranks."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            f"tensor_parallel_size={world} needs an initialised torch.distributed process group (run "
            "every rank under torchrun, or use `qwen2vl run --tensor-parallel-size N`)"
        )
    if dist.get_world_size() != world:
        raise ValueError(f"tensor_parallel_size={world}, but the process group has {dist.get_world_size()} ranks")


def load_rank_model(
    path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    cpu_kernels: bool | None = None,
    cpu_matmul: str = "auto",
    group: dist.ProcessGroup | None = None,
    quantize: str | None = None,
    shard_vision: bool = False,
    adapter=None,
    adapters=None,
    mmap: bool = True,
):
    """This rank's share of the model (weights.load_model with shard_decoder, and shard_vision when asked), inside
    an initialised process group: only the rank's slices of the sharded tensors are read."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return load_model(
        path,
        dtype=dtype,
        device=device,
        progress=progress,
        quantize=quantize,
        cpu_kernels=cpu_kernels,
        cpu_matmul=cpu_matmul,
        adapter=adapter,
        adapters=adapters,
        mmap=mmap,
        shard=lambda model: {
            **shard_decoder(model, rank, world, group),
            **(shard_vision_blocks(model, rank, world, group) if shard_vision else {}),
        },
    )
