"""Σ row bookkeeping (``serving/rows.py``), no vLLM: registered adapters take spare rows, rows come
back once their adapter is gone from the store and no vLLM id points at them, never before."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_jd.serving.rows import RowTable
from vllm_jd.store.errors import StoreError


def table(spare: int = 2) -> RowTable:
    # two adapters of the store at start (rows 0, 1), the none row 2, then `spare` rows
    return RowTable.start({"a": 0, "b": 1}, {"a": (0, 0, 0), "b": (1, 0, 0)}, np.array([0, 1, 0]), none_row=2,
                          spare=spare)


def test_spare_rows_then_a_clear_error():
    t = table()
    assert t.current("a", (0, 0, 0)) == 0 and t.current("a", (0, 1, 5)) is None
    for name, expected in (("x", 3), ("y", 4)):
        row, dirty = t.take(name, {"a", "b", "x", "y", "z"}, in_use=set())
        assert (row, dirty) == (expected, False)
        t.assign(name, row, (2, 1, 0))
    assert t.cluster_of_row.tolist() == [0, 1, 0, 2, 2]
    with pytest.raises(StoreError, match="no Σ row left for adapter 'z'"):
        t.take("z", {"a", "b", "x", "y", "z"}, in_use=set())


def test_rows_of_deleted_adapters_come_back_unless_in_use():
    t = table(spare=1)
    row, _ = t.take("x", {"a", "b", "x"}, in_use=set())
    t.assign("x", row, (2, 1, 0))
    # "x" is deleted from the store, but a running request still holds its id: its row stays
    with pytest.raises(StoreError):
        t.take("y", {"a", "b", "y"}, in_use={row})
    # "a" is deleted too and idle: its row is reused (dirty: zeroed before y's Σ is written)
    row_y, dirty = t.take("y", {"b", "y"}, in_use={row})
    assert (row_y, dirty) == (0, True) and "a" not in t.rows and t.rows["x"] == row


def test_a_name_registered_again_moves_and_its_old_row_is_freed_when_idle():
    t = table(spare=1)
    row, _ = t.take("x", {"a", "b", "x"}, in_use=set())
    t.assign("x", row, (2, 1, 0))
    assert t.current("x", (3, 2, 0)) is None  # registered again: other weights, another location
    with pytest.raises(StoreError):  # the only spare row is x's old one, still used by a running request
        t.take("x", {"a", "b", "x"}, in_use={row})
    new, dirty = t.take("x", {"a", "b", "x"}, in_use=set())
    assert dirty and new == row  # x's old row, zeroed by the caller before x's new Σ is written
    t.assign("x", new, (3, 2, 0))
    assert t.rows["x"] == row and t.current("x", (3, 2, 0)) == row
