"""Micro-batching: the images of concurrent requests go to the model together, in one call.

A request puts its images on a queue and awaits a future. One worker task takes the first waiting request,
then every request already queued and, while other requests are still being read and decoded
(:attr:`MicroBatcher.arriving`), those arriving within ``serve.max_batch_wait_ms``, up to
``serve.max_batch_size`` images (a lone request never waits). It predicts them in one call on a dedicated
thread: the event loop keeps accepting requests meanwhile, so under load the next batch is already waiting.
Requests that started on different model versions (a swap happened while they waited) are predicted by
their own model, each group in one call. At most ``serve.max_queue_images`` images wait: beyond that a
request is refused at once (:class:`OverloadedError`, a 503), so memory and latency stay bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from pipelines.release.serving.model_slot import ServedModel


class OverloadedError(Exception):
    """More images are waiting for the model than ``serve.max_queue_images``."""


@dataclass
class _Pending:
    model: ServedModel
    images: NDArray[np.float32]
    future: asyncio.Future[NDArray[np.float64]]


class MicroBatcher:
    """Queue of images waiting for the model, and the one worker that predicts them in batches."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_seconds: float,
        max_queue_images: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._max_batch = max_batch_size
        self._max_wait = max_wait_seconds
        self._max_queue = max_queue_images
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carry: _Pending | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.queued_images = 0
        """Images accepted and not yet handed to the model."""
        self.arriving = 0
        """Requests being read and decoded, not queued yet (kept by the caller): worth waiting for."""

    async def start(self) -> None:
        """Start the worker (call inside the running event loop)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlops-predict")
        self._worker = asyncio.create_task(self._run(), name="mlops-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still waiting get an error instead of hanging."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        pending = [self._carry] if self._carry is not None else []
        while self._queue is not None and not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if not item.future.done():
                item.future.set_exception(OverloadedError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def predict(self, model: ServedModel, images: NDArray[np.float32]) -> NDArray[np.float64]:
        """(N, k) probabilities of ``images`` by ``model``, predicted in a batch with concurrent requests."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        count = len(images)
        if self.queued_images + count > self._max_queue:
            raise OverloadedError(
                f"{self.queued_images} images are waiting for the model (serve.max_queue_images="
                f"{self._max_queue}); retry shortly"
            )
        future: asyncio.Future[NDArray[np.float64]] = asyncio.get_running_loop().create_future()
        self.queued_images += count
        self._queue.put_nowait(_Pending(model, images, future))
        return await future

    async def _next_batch(self) -> list[_Pending]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.images)
        deadline = loop.time() + self._max_wait
        while size < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self.arriving == 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(item.images) > self._max_batch:
                self._carry = item
                break
            batch.append(item)
            size += len(item.images)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            self.queued_images -= sum(len(item.images) for item in batch)
            live = [item for item in batch if not item.future.done()]  # a client may have gone
            groups: dict[int, list[_Pending]] = {}
            for item in live:
                groups.setdefault(id(item.model), []).append(item)
            for items in groups.values():
                images = items[0].images if len(items) == 1 else np.concatenate([item.images for item in items])
                if self._on_batch is not None:
                    self._on_batch(len(images))
                try:
                    probabilities = await loop.run_in_executor(self._executor, items[0].model.predict, images)
                except Exception as error:
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(error)
                    continue
                start = 0
                for item in items:
                    end = start + len(item.images)
                    if not item.future.done():
                        item.future.set_result(probabilities[start:end])
                    start = end
