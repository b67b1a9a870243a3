"""The on-disk tier: an IVF-PQ index whose inverted lists live in a file, built block by block.

FAISS's recipe for indices larger than memory (`faiss.contrib.ondisk`): train the coarse
quantizer and the PQ codebooks on a sample, add each block of vectors to its own inverted lists
(written to disk and dropped), then merge every block's lists into one `index.ivfdata` file that
searches memory-map. No step holds more than one block of vectors and the sample in memory, so
the build fits whatever the index's size; the vectors themselves come from a memory-mapped
`.npy` (the build's staging merge writes one, serve/indexing/staging.py).

Codes are 8-bit PQ (`IVF{nlist},PQ{m}`): FAISS's fast-scan 4-bit lists are packed in blocks
of 32 that `OnDiskInvertedLists` cannot hold. A served index's lists file never changes: items
added while it serves go to lists in memory beside it (serve/indexing/delta.py) until a
compaction writes new lists with `fill_lists`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk

from serve.indexing.delta import StoredRows
from serve.indexing.vector_search import IndexPlan, trained_index

log = logging.getLogger(__name__)

IVFDATA_FILE = "index.ivfdata"
SAVE_BLOCK_ROWS = 1 << 18  # rows converted at a time when vectors.npy is written as float16
BLOCK_ROWS = 1 << 20
"""Vectors added to one block's inverted lists at a time: at D = 512, 2 GB of float32 read
from the memory-mapped vectors, and the block's codes (m bytes + an 8-byte id per row)."""


def write_half_vectors(
    path: Path, vectors: StoredRows, rows: np.ndarray | None = None
) -> np.ndarray:
    """`vectors[rows]` (None: every row) written as float16 `vectors.npy` (half the file and
    the page cache; cosines within ~1e-3), block by block into a memory-mapped file, so no
    step copies them whole; returns the file memory-mapped."""
    count = len(vectors) if rows is None else len(rows)
    out = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float16, shape=(count, vectors.shape[1])
    )
    for start in range(0, count, SAVE_BLOCK_ROWS):
        block = slice(start, start + SAVE_BLOCK_ROWS)
        out[block] = vectors[block] if rows is None else vectors[rows[block]]
    out.flush()
    del out
    return np.load(path, mmap_mode="r", allow_pickle=False)


def build_ondisk_index(
    plan: IndexPlan, vectors: np.ndarray, directory: Path, *, block_rows: int | None = None
) -> faiss.Index:
    """The index of `plan` over `vectors` [N, D] (memory-mapped or not), its lists merged into
    `directory/index.ivfdata`; the returned index searches them (write it beside that file)."""
    trained = trained_index(plan, vectors)
    fill_lists(trained, vectors, directory, block_rows=block_rows)
    return trained


def fill_lists(
    trained: faiss.Index, vectors: np.ndarray, directory: Path, *, block_rows: int | None = None
) -> None:
    """`vectors` [N, D] (ids 0..N-1) added to the `trained` empty index block by block, and
    the blocks' lists merged into `directory/index.ivfdata`, which `trained` then searches."""
    blocks: list[Path] = []
    try:
        blocks = add_to_lists(trained, vectors, 0, directory / "block", block_rows=block_rows)
        merge_lists(trained, blocks, directory)
    finally:
        for path in blocks:
            path.unlink(missing_ok=True)


def add_to_lists(
    trained: faiss.Index,
    vectors: np.ndarray,
    first_id: int,
    stem: Path,
    *,
    block_rows: int | None = None,
) -> list[Path]:
    """`vectors` [n, D] (ids `first_id`...) added to copies of the `trained` empty index, one
    block of rows at a time, each block's lists written to `{stem}-{k:06d}.faiss` and dropped:
    the files `merge_lists` takes, in id order."""
    block_rows = block_rows or BLOCK_ROWS
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    files: list[Path] = []
    for start in range(0, len(vectors), block_rows):
        block = faiss.clone_index(trained)
        rows = np.ascontiguousarray(vectors[start : start + block_rows], dtype=np.float32)
        first = first_id + start
        block.add_with_ids(rows, np.arange(first, first + len(rows), dtype=np.int64))
        files.append(stem.with_name(f"{stem.name}-{len(files):06d}.faiss"))
        faiss.write_index(block, str(files[-1]))
        del block, rows  # one block in memory at a time
    return files


def merge_lists(trained: faiss.Index, files: list[Path], directory: Path) -> None:
    """The lists of `files` (`add_to_lists`'s, from any process, in id order: each list keeps
    its entries in that order) merged into `directory/index.ivfdata`, which `trained` then
    searches. The files are memory-mapped while they are merged, not read into memory."""
    merge_ondisk(trained, [str(path) for path in files], str(directory / IVFDATA_FILE))
    log.info("on-disk lists of %d vectors merged from %d files", trained.ntotal, len(files))


def read_ondisk_index(path: Path) -> faiss.Index:
    """An on-disk index written by `build_ondisk_index`: its lists are mapped from the
    `index.ivfdata` beside `path`, wherever the directory has moved since (the file records
    the path it was built at)."""
    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
