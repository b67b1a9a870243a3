"""Updates to the on-disk tier: rows added beside the snapshot's mapped ones, and their lists.

An on-disk index's inverted lists are one file written by the build's merge, and its vectors a
memory-mapped float16 `vectors.npy`; both stay exactly as the snapshot wrote them, so a journal
replayed after a crash applies to the same files. What changes while it serves lives in memory:

    rows    `AppendedRows`: the snapshot's mapped rows, then the added rows (float32). Indexing
            it by a slice or by row numbers reads only those rows, never the mapped file whole.
    lists   the delta: an IVF index with the snapshot's coarse quantizer and codebooks and
            in-memory lists (`empty_lists_copy`), holding the added rows; a search takes
            candidates from both and re-ranks them together.
    deletes masked out of searches (`VectorSearcher.deletes_in_index` is False), as HNSW's are:
            removing ids from the mapped lists would change the snapshot's file.

A compaction writes a new snapshot with the live rows in new lists (serve/indexing/compaction.py),
which empties both. Memory per added item until then: its vector (4·D bytes) and its code and id
in the delta (m + 8 bytes).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np


class AppendedRows:
    """[rows, D]: `snapshot` (memory-mapped float16 rows) followed by `added` (float32 rows in
    memory). Read-only; `VectorSearcher.add` makes a new one for each add."""

    def __init__(self, snapshot: np.ndarray, added: np.ndarray) -> None:
        if added.ndim != 2 or added.shape[1] != snapshot.shape[1]:
            raise ValueError(f"added rows {added.shape} do not fit rows of {snapshot.shape}")
        self.snapshot = snapshot
        self.added = added
        self.shape = (len(snapshot) + len(added), int(snapshot.shape[1]))
        self.ndim = 2
        # exact search widens rows block by block whenever the dtype is not float32 (it must
        # never hand this object to FAISS whole); the added rows are widened alike
        self.dtype = snapshot.dtype
        self.itemsize = snapshot.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray | int) -> np.ndarray:
        """Rows by a slice (step 1) or by row numbers of any shape, as float32 [..., D]."""
        snapshot_rows = len(self.snapshot)
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            head = self.snapshot[min(start, snapshot_rows) : min(stop, snapshot_rows)]
            tail = self.added[max(start - snapshot_rows, 0) : max(stop - snapshot_rows, 0)]
            return np.concatenate([head.astype(np.float32), tail])
        rows = np.asarray(key, dtype=np.int64)
        flat = rows.ravel()
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row out of range for {len(self)} rows")
        out = np.empty((len(flat), self.shape[1]), np.float32)
        mapped = flat < snapshot_rows
        out[mapped] = self.snapshot[flat[mapped]]
        out[~mapped] = self.added[flat[~mapped] - snapshot_rows]
        return out.reshape(*rows.shape, self.shape[1])


StoredRows = np.ndarray | AppendedRows
"""What a searcher's stored vectors may be: an array (in memory or mapped) or `AppendedRows`."""


def empty_lists_copy(index: faiss.Index) -> faiss.Index:
    """A copy of the trained IVF `index` whose inverted lists are empty and in memory: its
    coarse quantizer and codebooks, nothing of its lists (which may be on disk, and which
    FAISS cannot clone there). Serialized without the lists' data, so the copy costs the
    centroids and codebooks, not the index."""
    blob = faiss.serialize_index(index)  # on-disk lists: a header and the file's name only
    copy = faiss.deserialize_index(blob, faiss.IO_FLAG_SKIP_IVF_DATA)
    ivf: Any = faiss.extract_index_ivf(copy)
    lists: Any = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    lists.this.disown()  # the index owns them from here on, and frees them
    ivf.replace_invlists(lists, True)
    ivf.ntotal = 0
    copy.ntotal = 0
    return copy


def lists_on_disk(index: Any) -> bool:
    """Whether `index`'s inverted lists are read from disk (not held in memory)."""
    if index is None or not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return False
    ivf: Any = faiss.extract_index_ivf(index)
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
