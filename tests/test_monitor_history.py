"""gradguard.monitor.history.History against a naive reference: a plain list of every row."""

from __future__ import annotations

from typing import Any

import pytest

from gradguard.monitor.history import History


def _row(step: int) -> dict[str, Any]:
    return {"step": step, "loss": 1.0 / (step + 1), "grad_norm": float(step), "grad_norm/w": 2.0 * step}


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if "/" not in k}


@pytest.mark.parametrize(("limit", "steps", "block"), [(8, 5, 1), (8, 200, 1), (8, 200, 7), (5, 1000, 10)])
def test_recent_rows_are_identical_and_the_archive_is_an_even_power_of_two_subsample(
    limit: int, steps: int, block: int
) -> None:
    store, every = History(limit), []
    for start in range(0, steps, block):
        rows = [_row(s) for s in range(start, min(start + block, steps))]
        every.extend(rows)
        store.keep(rows, start + len(rows))
    out = store.rows()
    # The newest `limit` rows are kept whole, in order.
    assert out[len(out) - min(limit, steps):] == every[-limit:]
    older = [r["step"] for r in every[:-limit]] if steps > limit else []
    # Reference: the smallest power of two S whose multiples among the older steps number at most `limit`.
    stride = 1
    while sum(s % stride == 0 for s in older) > limit:
        stride *= 2
    archived = out[: len(out) - min(limit, steps)]
    assert [r["step"] for r in archived] == [s for s in older if s % stride == 0]
    assert len(archived) <= limit
    # Unmarked archived rows keep the global scalars only.
    assert archived == [_scalars(every[r["step"]]) for r in archived]


def test_marked_steps_are_archived_whole_whatever_the_stride() -> None:
    limit, steps, marked = 8, 100, (3, 37, 61)  # 3 marked + at most 5 others: the stride stays ≤ 100
    store = History(limit)
    for s in range(steps):
        if s in marked:
            store.mark((s,))
        store.keep([_row(s)], s + 1)
    archived = store.rows()[:-limit]
    by_step = {r["step"]: r for r in archived}
    # Odd steps: no stride above 1 keeps them, only the mark does; and they keep their per-tensor columns.
    for s in marked:
        assert by_step[s] == _row(s)
    assert all(r == _scalars(_row(r["step"])) for r in archived if r["step"] not in marked)
    assert sum(r["step"] not in marked for r in archived) <= limit
