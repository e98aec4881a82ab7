"""Per-image work on worker processes (pipelines/data/parallel.py): input order, errors in order, thresholds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipelines.data import parallel


def square_unless_13(items: list[int]) -> list[int]:
    """The worker function of these tests (module level, so spawned workers can import it)."""
    if 13 in items:
        raise ValueError("item 13 is refused")
    return [item * item for item in items]


def test_results_come_in_input_order_and_errors_in_their_place() -> None:
    results = list(parallel.ordered_map(square_unless_13, range(12), workers=2, chunk_items=2))
    assert results == [item * item for item in range(12)], "results in input order, one per item"

    seen: list[int] = []
    with pytest.raises(ValueError, match="item 13 is refused"):
        seen.extend(parallel.ordered_map(square_unless_13, range(40), workers=2, chunk_items=3))
    assert seen == [item * item for item in range(12)], f"every result before the failing chunk first: {seen}"

    def source() -> Iterator[int]:
        yield from range(30)
        raise OSError("the source broke after item 29")

    seen.clear()
    with pytest.raises(ValueError, match="item 13 is refused"):  # the earlier error wins, as in one process
        seen.extend(parallel.ordered_map(square_unless_13, source(), workers=2, chunk_items=5))
    seen.clear()
    with pytest.raises(OSError, match="after item 29"):
        seen.extend(parallel.ordered_map(square_unless_13, (i for i in source() if i != 13), workers=2))
    assert len(seen) == 29, f"the input's error comes after every result read before it: {len(seen)}"


def test_small_inputs_stay_in_this_process_and_the_environment_caps_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "worker_count", lambda: 2)
    assert parallel.workers_for(parallel.PARALLEL_MIN_ITEMS - 1) == 0, "a small dataset stays in this process"
    assert parallel.workers_for(parallel.PARALLEL_MIN_ITEMS) == 2, "a large one uses the cores"
    assert parallel.workers_for(None) == 2, "an unknown size (an S3 listing) uses the cores"
    monkeypatch.undo()
    monkeypatch.setenv(parallel.WORKERS_ENV, "1")
    assert parallel.worker_count() == 1, "MLOPS_DATA_WORKERS=1 means no worker process"
    assert parallel.workers_for(10**6) == 0, "so even a large dataset stays in this process"
    assert list(parallel.chunks(range(5), 2)) == [[0, 1], [2, 3], [4]], "chunks of the given size, the last shorter"
