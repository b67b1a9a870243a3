"""serve.indexing.staging: chunks count once their marker exists, a partial build is refused
without --resume, and one begun with other arguments or inputs is refused with what differs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from serve.indexing.index import IndexRow
from serve.indexing.sources import Part
from serve.indexing.staging import (
    Chunk,
    PartialBuildError,
    begin,
    chunk_stem,
    finished,
    merge,
    parts_digest,
    read_chunk,
    write_chunk,
)

BUILD = {"source": "photos", "part_count": 3, "batch_size": 8, "parts_digest": "abc"}


def chunk(first: int, count: int) -> Chunk:
    vectors = np.arange(first, first + count * 4, dtype=np.float32).reshape(count, 4)
    rows = [IndexRow(f"k{first + i}", "", {"i": first + i}) for i in range(count)]
    return Chunk(vectors, rows, Counter(corrupt_image=first))


def test_chunks_are_finished_once_marked_and_merge_in_part_order(tmp_path: Path):
    assert begin(tmp_path, BUILD, resume=False) == []
    write_chunk(tmp_path, 2, chunk(20, 2))
    write_chunk(tmp_path, 0, chunk(0, 3))
    Path(f"{chunk_stem(tmp_path, 1)}.npy").write_bytes(b"half written")  # killed before its marker
    assert finished(tmp_path) == [0, 2]
    assert read_chunk(tmp_path, 2).rows[1] == IndexRow("k21", "", {"i": 21})
    with pytest.raises(RuntimeError, match=r"parts \[1\] were not embedded"):
        merge(tmp_path, 3, 4, with_thumbnails=False)
    write_chunk(tmp_path, 1, chunk(10, 0))  # a part with no usable image
    merged = merge(tmp_path, 3, 4, with_thumbnails=False)
    assert [row.key for row in merged.rows] == ["k0", "k1", "k2", "k20", "k21"]
    assert merged.vectors.shape == (5, 4) and merged.vectors[3, 0] == 20
    # copied part by part into one memory-mapped file: no process holds every vector
    assert isinstance(merged.vectors, np.memmap)
    np.testing.assert_array_equal(np.load(tmp_path / "vectors.npy"), merged.vectors)
    assert merged.skipped == {"corrupt_image": 30}


def test_a_partial_build_is_refused_without_resume_and_continued_with_it(tmp_path: Path):
    begin(tmp_path, BUILD, resume=False)
    write_chunk(tmp_path, 0, chunk(0, 1))
    with pytest.raises(PartialBuildError, match=r"\(1 of 3 parts embedded\): pass --resume"):
        begin(tmp_path, BUILD, resume=False)
    assert begin(tmp_path, BUILD, resume=True) == [0]


def test_resuming_a_build_of_other_inputs_or_arguments_is_refused(tmp_path: Path):
    begin(tmp_path, BUILD, resume=False)
    other = {**BUILD, "batch_size": 16, "parts_digest": "def"}
    with pytest.raises(PartialBuildError, match=r"differs in: batch_size, parts_digest"):
        begin(tmp_path, other, resume=True)
    files = Part("files", "photos", ("a.png", "b.png"), ("a", "b"))
    grown = Part("files", "photos", ("a.png", "aa.png", "b.png"), ("a", "aa", "b"))
    assert parts_digest([files]) != parts_digest([grown])
