"""The index's write-ahead journal: every add and delete, fsynced before it is acknowledged.

`journal.log` sits in the index directory beside the snapshot it updates. It is a sequence of
records, each

    b"DJR1" | payload length (uint32 LE) | CRC-32 of the payload (uint32 LE) | payload

and a payload is a JSON header (its length as uint32 LE first) followed by the raw bytes it
describes: for an add, the float32 vectors [n, D] and then each item's thumbnail back to back.
Records carry increasing sequence numbers; the snapshot's manifest says the last one it contains
(`journal_seq`), so a load applies exactly the records after it.

A write is one `write` of the whole record and one `fsync`. A crash mid-write leaves a record cut
short at the end of the file: the reader stops at the first record whose length, magic or CRC is
wrong, and a writer cuts that tail off before appending. A write that fails (disk full) is cut
off the same way at once, so it changes nothing; if even that fails, the journal refuses further
writes until the service restarts and the reader drops the partial record.

One process writes an index: `WriterLock` takes an exclusive `flock` on `.NAME.lock` beside the
index directory (not inside it: compaction replaces the directory), shared within the process
so that a reload can open the index again while the old version drains.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.log"
_MAGIC = b"DJR1"
_HEAD = struct.Struct("<4sII")  # magic, payload length, CRC-32
_U32 = struct.Struct("<I")
MAX_RECORD_BYTES = 1 << 30


class JournalWriteError(RuntimeError):
    """An update could not be made durable (disk full, I/O error); nothing was changed."""


class IndexReadOnlyError(RuntimeError):
    """This process may not write the index (another one does, or its directory is read-only)."""


@dataclass(slots=True)
class Record:
    """One journalled update: `add` of items `ids` (with vectors, rows and thumbnails) or
    `delete` of items `ids`."""

    seq: int
    op: str
    ids: list[int]
    vectors: np.ndarray | None = None  # [n, D] float32, add only
    rows: list[dict[str, Any]] = field(default_factory=list)  # key, caption, url, meta
    thumbnails: list[bytes | None] = field(default_factory=list)

    def encode(self) -> bytes:
        """The whole record, header and CRC included, as written to the file."""
        thumbs = self.thumbnails or []
        header = {
            "seq": self.seq,
            "op": self.op,
            "ids": self.ids,
            "dim": 0 if self.vectors is None else int(self.vectors.shape[1]),
            "rows": self.rows,
            "thumbnail_bytes": [-1 if t is None else len(t) for t in thumbs],
        }
        head = json.dumps(header, separators=(",", ":")).encode()
        parts = [_U32.pack(len(head)), head]
        if self.vectors is not None:
            parts.append(np.ascontiguousarray(self.vectors, dtype="<f4").tobytes())
        parts.extend(t for t in thumbs if t is not None)
        payload = b"".join(parts)
        if len(payload) > MAX_RECORD_BYTES:
            raise ValueError(f"an update of {len(payload)} bytes is over {MAX_RECORD_BYTES}")
        return _HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> Record:
        (head_len,) = _U32.unpack_from(payload)
        header = json.loads(payload[4 : 4 + head_len])
        offset = 4 + head_len
        vectors = None
        count, dim = len(header["ids"]), int(header["dim"])
        if header["op"] == "add":
            size = count * dim * 4
            raw = payload[offset : offset + size]
            vectors = np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(count, dim)
            offset += size
        thumbnails: list[bytes | None] = []
        for size in header.get("thumbnail_bytes", []):
            thumbnails.append(None if size < 0 else payload[offset : offset + size])
            offset += max(size, 0)
        if offset != len(payload):
            raise ValueError("record length does not match its header")
        return cls(
            int(header["seq"]),
            header["op"],
            [int(i) for i in header["ids"]],
            vectors,
            header["rows"],
            thumbnails,
        )


def read_records(path: Path) -> tuple[list[tuple[int, Record]], int]:
    """The whole records of the journal at `path` with the byte offset each ends at, and the
    length of the valid prefix (what follows it is a torn or corrupt tail)."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    records: list[tuple[int, Record]] = []
    offset = 0
    for end, record in _scan(data):
        records.append((end, record))
        offset = end
    if offset < len(data):
        log.warning(
            "%s: %d bytes after the last whole record (a write cut short by a crash); ignored",
            path,
            len(data) - offset,
        )
    return records, offset


def _scan(data: bytes) -> Iterator[tuple[int, Record]]:
    offset = 0
    while offset + _HEAD.size <= len(data):
        magic, length, crc = _HEAD.unpack_from(data, offset)
        start = offset + _HEAD.size
        payload = data[start : start + length]
        if magic != _MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
            return
        try:
            record = Record.decode(payload)
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            log.error("journal record at byte %d passes its CRC but is unreadable: %s", offset, exc)
            return
        offset = start + length
        yield offset, record


class Journal:
    """The open journal of a writable index: appends records, each fsynced."""

    def __init__(self, path: Path, valid_bytes: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = os.fstat(self._fd).st_size
        if size > valid_bytes:  # a torn tail: cut it off before anything is appended after it
            os.ftruncate(self._fd, valid_bytes)
            os.fsync(self._fd)
        self.bytes = valid_bytes
        self._broken: str | None = None

    def append(self, record: Record) -> None:
        """Write `record` durably, or raise `JournalWriteError` having written nothing."""
        if self._broken is not None:
            raise JournalWriteError(self._broken)
        data = record.encode()
        try:
            written = os.pwrite(self._fd, data, self.bytes)
            if written != len(data):
                raise OSError(f"short write: {written} of {len(data)} bytes")
            os.fsync(self._fd)
        except OSError as exc:
            self._undo(exc)
            raise JournalWriteError(
                f"the update was not saved ({exc.strerror or exc}); nothing was changed"
            ) from exc
        self.bytes += len(data)

    def _undo(self, exc: OSError) -> None:
        try:
            os.ftruncate(self._fd, self.bytes)
            os.fsync(self._fd)
        except OSError as again:
            self._broken = (
                f"the journal could not be restored after a failed write ({exc}; then {again}); "
                "updates are refused until the service restarts"
            )
            log.error("%s: %s", self.path, self._broken)

    def tail_bytes(self, offset: int) -> bytes:
        """The journal's bytes from `offset` to its end (the records a compaction must keep)."""
        return os.pread(self._fd, self.bytes - offset, offset)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class WriterLock:
    """Exclusive right of this process to write the index at `directory`; shared in-process."""

    _held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, users)
    _guard = threading.Lock()

    def __init__(self, lock_path: Path) -> None:
        self.path = str(lock_path)
        self._released = False
        with self._guard:
            fd, users = self._held.get(self.path, (-1, 0))
            if fd < 0:
                fd = self._acquire(lock_path)
            self._held[self.path] = (fd, users + 1)

    @staticmethod
    def _acquire(lock_path: Path) -> int:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise IndexReadOnlyError(
                f"the index is written by {holder}; one process writes an index, "
                "so this one serves it read-only"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd

    def release(self) -> None:
        with self._guard:
            if self._released:
                return
            self._released = True
            fd, users = self._held[self.path]
            if users > 1:
                self._held[self.path] = (fd, users - 1)
                return
            del self._held[self.path]
            os.close(fd)  # closing the descriptor releases the flock
