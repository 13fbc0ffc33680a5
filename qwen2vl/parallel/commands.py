"""Rank 0 tells the other ranks what to do next: a broadcast of small Python objects on a Gloo group of its own.

The commands travel apart from the model's all-reduces (the default group, NCCL on GPUs), with no practical
timeout: a rank waiting for the next chat line or the next server request may wait for days, while a collective
inside a forward pass still fails after the launcher's timeout. Tensors in a command must be on the CPU (each
rank moves them to its own device). When rank 0 dies, the waiting ranks' broadcast fails at once (the
connection closes), so they exit instead of waiting for ever.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

WAIT = timedelta(days=365)
_group: dist.ProcessGroup | None = None


def _commands() -> dist.ProcessGroup:
    """The command group, made on first use (every rank's first use must be at the same point of the program)."""
    global _group
    if _group is None:
        _group = dist.new_group(backend="gloo", timeout=WAIT)
    return _group


def forget() -> None:
    """Before the process group is destroyed: the command group goes with it."""
    global _group
    _group = None


def share(value: Any = None) -> Any:
    """Rank 0's `value` on every rank: rank 0 passes it, the others wait for it (and pass nothing)."""
    box = [value]
    dist.broadcast_object_list(box, src=0, group=_commands())
    return box[0]
