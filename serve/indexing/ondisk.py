"""The on-disk tier: an IVF-PQ index whose inverted lists live in a file, built block by block.

FAISS's recipe for indices larger than memory (`faiss.contrib.ondisk`): train the coarse
quantizer and the PQ codebooks on a sample, add each block of vectors to its own inverted lists
(written to disk and dropped), then merge every block's lists into one `index.ivfdata` file that
searches memory-map. No step holds more than one block of vectors and the sample in memory, so
the build fits whatever the index's size; the vectors themselves come from a memory-mapped
`.npy` (the build's staging merge writes one, serve/indexing/staging.py).

Codes are 8-bit PQ (`IVF{nlist},PQ{m}`): FAISS's fast-scan 4-bit lists are packed in blocks
of 32 that `OnDiskInvertedLists` cannot hold. A served on-disk index is read-only: its lists
are one file written by the merge, so items are added by building it again (see
docs/operations.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from serve.indexing.vector_search import IndexPlan, trained_index

log = logging.getLogger(__name__)

IVFDATA_FILE = "index.ivfdata"
BLOCK_ROWS = 1 << 20
"""Vectors added to one block's inverted lists at a time: at D = 512, 2 GB of float32 read
from the memory-mapped vectors, and the block's codes (m bytes + an 8-byte id per row)."""


def build_ondisk_index(
    plan: IndexPlan, vectors: np.ndarray, directory: Path, *, block_rows: int | None = None
) -> faiss.Index:
    """The index of `plan` over `vectors` [N, D] (memory-mapped or not), its lists merged into
    `directory/index.ivfdata`; the returned index searches them (write it beside that file)."""
    block_rows = block_rows or BLOCK_ROWS
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    trained = trained_index(plan, vectors)
    blocks: list[str] = []
    try:
        for start in range(0, len(vectors), block_rows):
            block = faiss.clone_index(trained)
            rows = np.ascontiguousarray(vectors[start : start + block_rows], dtype=np.float32)
            block.add_with_ids(rows, np.arange(start, start + len(rows), dtype=np.int64))
            blocks.append(str(directory / f"block-{len(blocks):06d}.faiss"))
            faiss.write_index(block, blocks[-1])
            del block, rows  # one block in memory at a time
        merge_ondisk(trained, blocks, str(directory / IVFDATA_FILE))
    finally:
        for name in blocks:
            if os.path.exists(name):
                os.remove(name)
    log.info("on-disk lists of %d vectors merged from %d blocks", len(vectors), len(blocks))
    return trained


def read_ondisk_index(path: Path) -> faiss.Index:
    """An on-disk index written by `build_ondisk_index`: its lists are mapped from the
    `index.ivfdata` beside `path`, wherever the directory has moved since (the file records
    the path it was built at)."""
    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def lists_on_disk(index: Any) -> bool:
    """Whether `index`'s inverted lists are read from disk (not held in memory)."""
    ivf: Any = faiss.extract_index_ivf(index)
    return isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)
