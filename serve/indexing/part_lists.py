"""The on-disk tier's inverted lists built by the processes that embedded the parts.

Rank 0 trains the coarse quantizer and the PQ codebooks once, on a sample of the merged vectors,
and writes the empty trained index to the staging folder (`trained.faiss`); every rank then adds
its own parts' vectors, read memory-mapped from their chunks, to lists files of its own
(`lists-{part}-{block}.faiss`), all ranks at once; rank 0 merges every part's files, in part
order, into `index.ivfdata` (`ondisk.merge_lists`). Each inverted list then holds its entries
in id order, as one process adding every vector leaves it, so the index is the same whatever
the number of processes. No process holds more than one block of vectors and the sample.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from serve.indexing.ondisk import add_to_lists
from serve.indexing.staging import chunk_stem, part_offsets
from serve.indexing.vector_search import IndexPlan, trained_index

TRAINED_FILE = "trained.faiss"


@dataclass(frozen=True, slots=True)
class PartLists:
    """An on-disk build's lists, made by parts: what every rank needs to add its own."""

    plan: IndexPlan
    staging: Path
    offsets: list[int]
    """The id of each part's first row (parts in order, as the merged rows)."""
    train_seconds: float
    add_seconds: float = 0.0
    """Wall-clock seconds of the ranks' adds (rank 0's view: until every rank had finished)."""

    def trained(self) -> faiss.Index:
        """The trained, empty index (each block's lists are added to a copy of it)."""
        return faiss.read_index(str(self.staging / TRAINED_FILE))

    def files(self) -> list[Path]:
        """Every part's lists files in part order, then block order: id order."""
        return sorted(self.staging.glob("lists-[0-9]*.faiss"))


def train_lists(staging: Path, plan: IndexPlan, vectors: np.ndarray, part_count: int) -> PartLists:
    """Rank 0: train `plan`'s index on a sample of the merged `vectors` (memory-mapped) and
    write it where the ranks read it; lists files of an earlier, killed run are removed."""
    for stale in staging.glob("lists-*.faiss"):
        stale.unlink()
    start = time.perf_counter()
    trained = trained_index(plan, vectors)
    faiss.write_index(trained, str(staging / TRAINED_FILE))
    return PartLists(plan, staging, part_offsets(staging, part_count), time.perf_counter() - start)


def add_parts(lists: PartLists, part_indices: Iterable[int]) -> int:
    """Add the vectors of `part_indices` (this rank's parts) to lists files of their own; the
    number of vectors added."""
    trained = lists.trained()
    added = 0
    for i in part_indices:
        vectors = np.load(f"{chunk_stem(lists.staging, i)}.npy", mmap_mode="r", allow_pickle=False)
        if len(vectors):  # a part whose every image was skipped adds nothing
            add_to_lists(trained, vectors, lists.offsets[i], lists.staging / f"lists-{i:06d}")
            added += len(vectors)
    return added
