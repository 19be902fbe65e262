"""Group commit: concurrent writes share one transaction instead of one each.

A worker handles up to its prefetch of messages at once; each asks the store for one write. A flush takes
what was submitted in the same turn of the event loop (the handlers of one batch of deliveries), and those
that arrive while a flush is running wait for the next one, so N messages cost one commit (one WAL flush,
one round trip) instead of N, and batches grow with the load. An idle worker adds no latency: a flush
starts on the next turn. When a shared flush fails, each of its items is retried alone: one bad write (or a
deadlock, or a lost connection) fails its own message only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from authnotify.errors import StoreError

Item = TypeVar("Item")
Result = TypeVar("Result")

BATCH_MAX = 128
FLUSHES_MAX = 1  # one transaction in flight: the next batch collects while it commits


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]


def _settle(future: asyncio.Future[Result], result: Result | None, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled: its message is redelivered, the effect stays
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


class GroupCommit(Generic[Item, Result]):
    """``await group.submit(item)`` returns once ``flush`` has committed the batch ``item`` was part of."""

    def __init__(self, flush: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]], *, name: str,
                 batch_max: int = BATCH_MAX, flushes_max: int = FLUSHES_MAX) -> None:
        self._flush = flush
        self._name = name
        self._batch_max = batch_max
        self._flushes_max = flushes_max
        self._pending: list[_Pending[Item, Result]] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._collecting = False  # a flush is started and takes its batch on its first step

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future))
        self._start_flushes()
        return await future

    def _start_flushes(self) -> None:
        if self._pending and not self._collecting and len(self._flushes) < self._flushes_max:
            self._collecting = True
            task = asyncio.create_task(self._run(), name=self._name)
            self._flushes.add(task)
            task.add_done_callback(self._flush_done)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if task.cancelled():  # perhaps before its first step: it took nothing
            self._collecting = False
        self._start_flushes()

    async def _run(self) -> None:
        # The items submitted in the turn this task was created in (and any still waiting) are ours.
        self._collecting = False
        batch = self._pending[:self._batch_max]
        del self._pending[:self._batch_max]
        self._start_flushes()  # more than a batch waiting: the next flush may start alongside
        if not batch:
            return
        try:
            await self._run_now(batch)
        except BaseException:  # cancelled (shutdown): no caller may wait forever
            for pending in batch:
                _settle(pending.future, None, StoreError(f"{self._name}: interrupted"))
            raise

    async def _run_now(self, batch: list[_Pending[Item, Result]]) -> None:
        try:
            results = await self._flush([pending.item for pending in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, None, exc)
                return
        else:
            for pending, result in zip(batch, results, strict=True):
                _settle(pending.future, result, None)
            return
        for pending in batch:  # each alone: an error lands on its own message only
            try:
                (result,) = await self._flush([pending.item])
            except Exception as exc:
                _settle(pending.future, None, exc)
            else:
                _settle(pending.future, result, None)

    async def close(self) -> None:
        """Waits for the batches already taken: they are committed (or failed) before the pool goes."""
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
