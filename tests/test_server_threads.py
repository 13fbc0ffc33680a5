"""The state the engine thread and the event loop share (routes, the token-rate window), under concurrent use.
Without the EngineLoop's lock the rate's rebuild of its window loses tokens the engine thread records meanwhile."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

from qwen2vl.engine.engine import Output
from qwen2vl.serve.server import EngineLoop


def test_no_token_is_lost_while_the_rate_is_read():
    # thread switches every 10 us instead of 5 ms, so the engine thread's record and the event loop's expiry
    # interleave as finely as they can: the window's running count must stay the sum of what it holds
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        _count_tokens_while_reading(50_000, window=1e6)  # nothing expires: every token is counted
        _count_tokens_while_reading(50_000, window=1e-4)  # the reader expires entries as the writer adds them
    finally:
        sys.setswitchinterval(old)


def _count_tokens_while_reading(steps: int, window: float) -> None:
    loop = EngineLoop(engine=None)  # the thread is not started: deliver() is called the way the engine thread does

    def engine_thread() -> None:
        for _ in range(steps):
            loop.deliver([Output("r", 1)])

    writer = threading.Thread(target=engine_thread)
    writer.start()
    while writer.is_alive():  # the event loop reading /metrics as fast as it can
        loop.tokens_per_second(window=window)
    writer.join()
    if window > 1e3:
        assert round(loop.tokens_per_second(window=window) * window) == steps
    else:  # once everything has expired, nothing may be left over in the running count
        time.sleep(2 * window)
        assert loop.tokens_per_second(window=window) == 0


def test_outputs_reach_their_routes_while_routes_change():
    async def main() -> None:
        loop = EngineLoop(engine=None)
        running = asyncio.get_running_loop()
        queues = {f"r{i}": asyncio.Queue() for i in range(50)}
        for rid, q in queues.items():
            loop.route(rid, running, q)
        churn_done = threading.Event()

        def engine_thread() -> None:  # delivers to every route 200 times while the event loop adds and drops others
            for _ in range(200):
                loop.deliver([Output(rid, 7) for rid in queues])
            churn_done.set()

        writer = threading.Thread(target=engine_thread)
        writer.start()
        extra = 0
        while not churn_done.is_set():
            loop.route(f"x{extra}", running, asyncio.Queue())
            loop.unroute(f"x{extra}")
            extra += 1
            await asyncio.sleep(0)
        writer.join()
        await asyncio.sleep(0.05)  # let call_soon_threadsafe callbacks run
        assert all(q.qsize() == 200 for q in queues.values())
        for rid in queues:
            loop.unroute(rid)
        assert loop.routed() == 0

    asyncio.run(main())
