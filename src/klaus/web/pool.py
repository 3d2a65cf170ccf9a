"""The bounded pool `klaus serve` decodes photos in: a few jobs at once within a memory budget.

Thumbnails and uploads are decoded in worker threads, admitted on the event loop by
:class:`WorkGate`: at most a few jobs run at once and their estimated bytes stay within a
budget, a few more requests wait in arrival order, and one more (or one that waits too
long) raises :class:`Busy`, which the app answers with 503 and ``Retry-After``. Upload
bodies held in memory have a budget of their own (:class:`ByteBudget`). The heap is given
back to the system after large work and whenever the pool falls idle.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..memory import release_free_heap

#: Decoding jobs (thumbnails, classify) that run at once: one per core, at most 4.
DEFAULT_JOBS = max(1, min(4, os.cpu_count() or 1))
#: Requests that may wait for a decoding turn (they hold no thread while waiting; an upload's
#: body counts against the upload budget); one more gets 503 with Retry-After.
DEFAULT_QUEUE = 64
#: Bytes of decoding that may be in flight (klaus.images.decode_bytes of each job); a job
#: larger than this (a photo near the pixel limit) runs alone.
WORK_MEMORY_BUDGET = 384 << 20
#: Added to a classify job's decoding: the model's activations for one photo.
MODEL_RUN_BYTES = 64 << 20
#: Upload bodies held in memory at once, at least (4 uploads of the largest size otherwise).
MIN_UPLOAD_BUDGET = 64 << 20
#: A job at least this large gives its freed heap back to the system when it ends.
TRIM_BYTES = 32 << 20
#: Seconds a job waits for its turn before it is answered 503; and the Retry-After it is told.
MAX_WAIT_SECONDS = 30.0
RETRY_AFTER_SECONDS = 2
BUSY_HEADERS = {"Retry-After": str(RETRY_AFTER_SECONDS)}
BUSY_MESSAGE = "the server is busy with other photos; try again in a moment"


class Busy(Exception):
    """No room for more work now: 503 with Retry-After."""


@dataclass
class _Waiter:
    cost: int
    future: asyncio.Future


class WorkGate:
    """The bounded pool heavy work runs in, as a gate the requests pass on the event loop.

    At most ``jobs`` jobs run at once (each in a worker thread), and the estimated bytes of
    the running jobs stay within ``budget`` (a job larger than the budget runs only when
    nothing else does); at most ``queue`` requests wait, in arrival order (a large job at the
    head is not overtaken, so it is not starved), holding no thread while they wait; one
    more, or a wait longer than :data:`MAX_WAIT_SECONDS`, raises :class:`Busy`. When a large
    job ends, or the last running one, the freed heap is returned to the system
    (:func:`klaus.memory.release_free_heap`), so a burst of large photos does not leave the
    server's memory at its peak. Used from one event loop only.
    """

    def __init__(self, jobs: int, queue: int, budget: int) -> None:
        if jobs < 1 or queue < 0 or budget < 1:
            raise ValueError("jobs and budget must be at least 1, queue at least 0")
        self.jobs, self.queue, self.budget = jobs, queue, budget
        self.running = 0
        self._bytes = 0
        self._line: deque[_Waiter] = deque()

    def _fits(self, cost: int) -> bool:
        return self.running < self.jobs and (self.running == 0 or self._bytes + cost <= self.budget)

    def _admit(self, cost: int) -> None:
        self.running += 1
        self._bytes += cost

    def _wake(self) -> None:
        while self._line and self._fits(self._line[0].cost):
            waiter = self._line.popleft()
            if not waiter.future.done():
                self._admit(waiter.cost)
                waiter.future.set_result(None)

    async def run(self, cost: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread as one job of about ``cost`` bytes; :class:`Busy` if no room."""
        if not self._line and self._fits(cost):
            self._admit(cost)
        elif len(self._line) >= self.queue:
            raise Busy()
        else:
            waiter = _Waiter(cost, asyncio.get_running_loop().create_future())
            self._line.append(waiter)
            try:
                await asyncio.wait_for(asyncio.shield(waiter.future), MAX_WAIT_SECONDS)
            except (TimeoutError, asyncio.CancelledError) as exc:  # waited too long, or the client went away
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release(cost)  # admitted just as the wait ended: give the turn back
                else:
                    waiter.future.cancel()
                    if waiter in self._line:
                        self._line.remove(waiter)
                    self._wake()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise Busy() from None
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            if self._release(cost) or cost >= TRIM_BYTES:
                asyncio.get_running_loop().run_in_executor(None, release_free_heap)  # not awaited: no one waits for it

    def _release(self, cost: int) -> bool:
        """One job ended: wake whoever fits now; whether the pool is idle."""
        self.running -= 1
        self._bytes -= cost
        self._wake()
        return self.running == 0


class ByteBudget:
    """Bytes that may be held at once (upload bodies); :class:`Busy` beyond."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        with self._lock:
            if self._held and self._held + size > self.limit:
                raise Busy()
            self._held += size
        try:
            yield
        finally:
            with self._lock:
                self._held -= size
