"""Which LoRA adapter each batch row uses during a call: set by whoever batches requests of different adapters
(the engine), read by the layers that hold several adapters side by side (qwen2vl.lora.MultiLoRALinear). A
context variable, scoped to the call: the model keeps no state between calls, and the model code never reads it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

_ROWS: ContextVar[tuple[int, ...] | None] = ContextVar("qwen2vl_adapter_rows", default=None)


@contextmanager
def adapters_for_rows(rows: Sequence[int]) -> Iterator[None]:
    """Within: batch row b of a side-by-side adapter layer's input takes adapter rows[b] (-1: none)."""
    token = _ROWS.set(tuple(rows))
    try:
        yield
    finally:
        _ROWS.reset(token)


def adapter_rows() -> tuple[int, ...] | None:
    """The rows' adapters of the call in progress; None outside adapters_for_rows (every row: none)."""
    return _ROWS.get()
