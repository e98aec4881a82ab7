"""Per-image CPU work spread over the machine's cores, results in input order.

Ingest (decode, normalise, encode) and validation (decode, measure) spend their time in Pillow's per-image
work, one core at a time; with Python's GIL a thread pool measured slower on two cores. :func:`ordered_map`
hands chunks of the input to worker processes and yields the results in the order of the input, so the
output (a pack, a manifest, a report) is byte-for-byte what the same work done in-process gives. It reads
the input lazily and keeps at most a few chunks in flight, so memory stays bounded however large the input.

Below :data:`PARALLEL_MIN_ITEMS` items, or with one usable core, :func:`workers_for` says to do the work in
this process (the caller's own loop, the same per-item function): starting
worker processes (``spawn``: a fresh interpreter that imports the worker's module, safe in a process that
holds threads, such as an Airflow task or a TensorFlow program) costs more than it saves on a small
dataset such as the built-in sample. ``MLOPS_DATA_WORKERS`` caps the number of worker processes (``1``: no
worker process at all).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

PARALLEL_MIN_ITEMS = 4000
"""Fewer items than this (when known up front) are processed in this process."""

CHUNK_ITEMS = 256
"""Items sent to a worker at a time: large enough that pickling and scheduling are a small part."""

WORKERS_ENV = "MLOPS_DATA_WORKERS"
"""Environment variable capping the number of worker processes (1: none)."""


def worker_count() -> int:
    """How many worker processes to use: the cores this process may run on, capped by ``MLOPS_DATA_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    cap = os.environ.get(WORKERS_ENV, "").strip()
    if cap.isdigit() and int(cap) > 0:
        cores = min(cores, int(cap))
    return max(cores, 1)


def workers_for(total: int | None) -> int:
    """Worker processes to use for ``total`` items (None: unknown); 0 means do the work in this process."""
    workers = worker_count()
    if workers < 2 or (total is not None and total < PARALLEL_MIN_ITEMS):
        return 0
    return workers


def chunks(items: Iterable[T], size: int = CHUNK_ITEMS) -> Iterator[list[T]]:
    """``items`` in lists of ``size`` (the last one shorter), read lazily.

    When reading ``items`` raises, the items read before the error are yielded first, then the error is raised:
    whoever processes the chunks meets the errors in the order one item at a time would.
    """
    chunk: list[T] = []
    try:
        for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except Exception:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


class _Prefetch(Generic[T]):
    """Chunks of an iterable, read ahead by a background thread into a bounded queue.

    Reading the input (a source's files: system calls that release the GIL) then overlaps with this process's
    own share of the work. An exception raised by the input is handed over in its place in the sequence.
    """

    _DONE = object()

    def __init__(self, items: Iterable[T], size: int, depth: int) -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(items, size), name="prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, items: Iterable[T], size: int) -> None:
        try:
            for chunk in chunks(items, size):
                if not self._put(chunk):
                    return
        except BaseException as error:  # handed to the consumer, raised there in order
            self._put(_Raised(error))
            return
        self._put(self._DONE)

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item  # type: ignore[misc]

    def close(self) -> None:
        """Stop reading ahead and wait for the thread (it finishes the item it is reading)."""
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class _Raised:
    error: BaseException


def ordered_map(
    function: Callable[[list[T]], list[R]],
    items: Iterable[T],
    *,
    workers: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
    chunk_items: int = CHUNK_ITEMS,
) -> Iterator[R]:
    """``function`` applied to chunks of ``items`` in ``workers`` processes, results yielded in input order.

    ``function`` takes a list of items and returns one result per item; it must be a module-level function
    (or a :func:`functools.partial` of one) and items, results and ``initargs`` must pickle.
    ``initializer(*initargs)`` runs once in every worker, e.g. to open a pack once. The input is read ahead
    by a thread of this process (it may read files: that overlaps with this process's work) and at most
    ``2 * workers + 1`` chunks are in flight, so memory stays bounded. Errors come in input order, as one
    process would raise them: an exception raised by ``function`` for a chunk, or by the input while reading
    it, is raised here once every result before it was yielded; the work not started yet is cancelled.
    """
    context = multiprocessing.get_context("spawn")
    prefetch = _Prefetch(items, chunk_items, 2 * workers + 2)
    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
            pending: deque[Future[list[R]]] = deque()
            try:
                chunks_read = iter(prefetch)
                while True:
                    try:
                        chunk = next(chunks_read)
                    except StopIteration:
                        break
                    except Exception:
                        while pending:  # what came before the input's error is yielded (or raises) first
                            yield from pending.popleft().result()
                        raise
                    pending.append(pool.submit(function, chunk))
                    if len(pending) >= 2 * workers + 1:
                        yield from pending.popleft().result()
                while pending:
                    yield from pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()
    finally:
        prefetch.close()
