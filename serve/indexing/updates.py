"""What updates change in a loaded index: item ids of rows, deleted rows, added items' metadata.

A snapshot's rows are numbered 0..N-1 (their position in `vectors.npy` and the FAISS index);
each row holds an *item id*, the stable name clients use: `ids.npy` (absent in an index never
compacted, where id = row). Added items take ids from the manifest's `next_id` upward and
become new rows at the end; ids are never reused, and stay sorted by row, so an id's row is a
binary search. A deleted row stays (masked out of searches, or dropped from IVF lists) until a
compaction writes a snapshot without it.

`ItemTable` holds this for one loaded index and applies journal records to it and to the
`VectorSearcher`; `SearchIndex` calls it under its write lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.indexing.journal import Record
from serve.indexing.vector_search import VectorSearcher, grown


@dataclass(frozen=True, slots=True)
class AddedItem:
    """Metadata of an item added since the snapshot (the snapshot's live in SQLite)."""

    key: str
    caption: str
    meta: dict[str, Any]
    url: str
    thumbnail: bytes | None


class ItemTable:
    """Row <-> item id, which rows are deleted, and the items added since the snapshot."""

    def __init__(self, snapshot_ids: np.ndarray, next_id: int, journal_seq: int) -> None:
        self._ids = np.asarray(snapshot_ids, dtype=np.int64)  # [rows], sorted
        self._count = len(self._ids)
        self.snapshot_rows = self._count
        self._alive = np.ones(self._count, dtype=bool)
        self.deleted = 0
        self.next_id = next_id
        self.seq = journal_seq
        self.added: dict[int, AddedItem] = {}

    @property
    def rows(self) -> int:
        return self._count

    @property
    def live(self) -> int:
        return self._count - self.deleted

    @property
    def ids(self) -> np.ndarray:
        """[rows] item id of each row."""
        return self._ids[: self._count]

    def alive_mask(self) -> np.ndarray | None:
        """[rows] False for deleted rows; None when none is deleted."""
        return self._alive[: self._count] if self.deleted else None

    def row_of(self, item_id: int) -> int | None:
        """The row of a live item, or None."""
        ids = self.ids
        row = int(np.searchsorted(ids, item_id))
        if row < len(ids) and ids[row] == item_id and self._alive[row]:
            return row
        return None

    def rows_of(self, item_ids: Sequence[int]) -> tuple[np.ndarray, list[int]]:
        """Rows of the live items among `item_ids`, and the ids that are not live items."""
        rows, missing = [], []
        for item_id in item_ids:
            row = self.row_of(int(item_id))
            if row is None:
                missing.append(int(item_id))
            else:
                rows.append(row)
        return np.asarray(rows, dtype=np.int64), missing

    def apply(self, record: Record, searcher: VectorSearcher) -> None:
        """Apply one journal record (in sequence order) to this table and to `searcher`."""
        if record.seq != self.seq + 1:
            raise ValueError(f"journal record {record.seq} follows {self.seq}: a record is missing")
        if record.op == "add":
            self._add(record, searcher)
        elif record.op == "delete":
            self._delete(record, searcher)
        else:
            raise ValueError(f"unknown journal operation {record.op!r}")
        self.seq = record.seq

    def _add(self, record: Record, searcher: VectorSearcher) -> None:
        assert record.vectors is not None
        if record.ids and record.ids[0] < self.next_id:
            raise ValueError(f"journal adds id {record.ids[0]}, below next id {self.next_id}")
        searcher.add(record.vectors)
        new = np.asarray(record.ids, dtype=np.int64)
        self._ids = grown(self._ids, self._count, new)
        self._alive = grown(self._alive, self._count, np.ones(len(new), dtype=bool))
        self._count += len(new)
        thumbnails = record.thumbnails or [None] * len(new)
        for item_id, row, thumbnail in zip(record.ids, record.rows, thumbnails, strict=True):
            self.added[item_id] = AddedItem(
                row["key"], row["caption"], row["meta"], row["url"], thumbnail
            )
        self.next_id = int(new[-1]) + 1 if len(new) else self.next_id

    def _delete(self, record: Record, searcher: VectorSearcher) -> None:
        rows, _ = self.rows_of(record.ids)
        if not len(rows):
            return
        self._alive[rows] = False
        self.deleted += len(rows)
        searcher.remove(rows)
        for item_id in record.ids:
            self.added.pop(item_id, None)
