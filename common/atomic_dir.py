"""Replacing a directory in one step: a reader, or a crash, finds the old one or the new one.

Every directory the project writes whole (a model artifact, its ONNX towers, an index snapshot)
is written to a staging sibling `.NAME.KIND-HOST-PID-*` made by `staging_dir`, then put in place
by `replace_dir`:

1. every file in the staging directory and the directory itself are fsynced, so what the rename
   publishes is on disk before the rename is;
2. the staging directory and NAME are exchanged in one step (Linux renameat2 RENAME_EXCHANGE);
   where the filesystem cannot, NAME is moved aside into a `.NAME.old-…` directory and the staging
   directory renamed to NAME (a moment in between where NAME is absent);
3. the parent directory is fsynced, making the rename itself durable, and the old one deleted.

A process killed anywhere in this leaves staging directories named by its host and pid;
`remove_stale` (called by `staging_dir`) deletes those of dead processes and, if a kill came
between the two renames of step 2, puts the old NAME back.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from common.permissions import make_readable

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100


def staging_dir(target: str | Path, kind: str = "build") -> Path:
    """A new empty sibling of `target` to write its replacement in (stale ones removed first)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    return Path(tempfile.mkdtemp(prefix=_prefix(target, kind), dir=target.parent))


def replace_dir(staged: str | Path, target: str | Path) -> None:
    """Make the finished directory `staged` the one at `target`, durably; delete the old one."""
    staged, target = Path(staged), Path(target)
    make_readable(staged)  # mkdtemp's 0700 would hide it from a reader running as another user
    fsync_tree(staged)
    if not target.exists():
        os.replace(staged, target)
    elif _exchange(staged, target):
        fsync_dir(target.parent)
        shutil.rmtree(staged)  # now the old one; open readers keep their files until closed
        return
    else:
        old = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
        os.replace(target, old / target.name)  # put back by `remove_stale` if killed here
        os.replace(staged, target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
        return
    fsync_dir(target.parent)


def remove_stale(target: str | Path) -> None:
    """Delete staging directories of `target` left on this host by processes that are gone; if a
    kill left no `target` at all (between the two renames of the fallback), put the old one back."""
    target = Path(target)
    host = _host()
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.([\w]+)-{re.escape(host)}-(\d+)-")
    for path in sorted(target.parent.glob(f".{glob.escape(target.name)}.*")):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or _alive(int(match.group(2))):
            continue  # another host's, or its writer is still running
        kept = path / target.name
        if match.group(1) == "old" and kept.is_dir() and not target.exists():
            os.replace(kept, target)
            log.warning("restored %s from %s, left by a writer that was killed", target, path)
        log.info("removing %s, left by a writer that was killed", path)
        shutil.rmtree(path, ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory, deepest first."""
    directories = []
    for parent, dirs, files in os.walk(root):
        directories.append(Path(parent))
        for name in files:
            path = Path(parent) / name
            if path.is_file() and not path.is_symlink():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        dirs.sort()
    for directory in reversed(directories):
        fsync_dir(directory)


def fsync_dir(path: Path) -> None:
    """fsync a directory: makes the creation, rename or removal of its entries durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _prefix(target: Path, kind: str) -> str:
    """`.NAME.KIND-HOST-PID-`: whose staging directory it is, for cleaning up after kills."""
    if not kind.isidentifier():
        raise ValueError(f"kind must be a plain word, got {kind!r}")
    return f".{target.name}.{kind}-{_host()}-{os.getpid()}-"


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories `a` and `b` (Linux renameat2); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc < 2.28
        return False
    args = (_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if renameat2(*args) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem cannot
        return False
    raise OSError(code, f"cannot swap {a} into {b}: {os.strerror(code)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
