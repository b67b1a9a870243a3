"""Shard lists, shard reading and raw samples in the webdataset/img2dataset layout.

Shared by the trainer's pipeline and the index builder, so both read shards the same way and
skip the same bad samples for the same, counted, reasons. A shard is a tar of KEY.jpg + KEY.txt
[+ KEY.json] members, named by a path or a webdataset URL (`pipe:CMD` streams CMD's stdout).
"""

from __future__ import annotations

import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import braceexpand
from webdataset.gopen import Pipe, gopen

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
SKIP_REASONS = (
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_caption",
    "corrupt_image",
    "truncated_image",
    "unsupported_format",
    "image_too_large",
    "image_too_thin",
    "file_too_large",
    "truncated_member",
    "failed_shard",
    "unreadable_file",
    "duplicate_key",
)
"""Why something is skipped; every skip is counted under exactly one of these. All count samples
except `failed_shard`, which counts whole shards (or parquet files) that could not be read after
their retries; `unreadable_file` is an image file of a folder that could not be read;
`duplicate_key` a sample whose key came earlier in the same shard (the first one is kept).
The image's own: `corrupt_image` (not an image), `truncated_image` (its data ends early),
`unsupported_format` (a format the service refuses), `image_too_large` (decoded pixels),
`image_too_thin` (pixels once resized for the model), `file_too_large` (bytes; index builds)."""

DEFAULT_SHARD_RETRIES = 2
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is the counter key it is skipped under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnreadableShardError(OSError):
    """A shard that cannot be opened or is not a tar at all: worth retrying (I/O may recover)."""


class TruncatedShardError(ValueError):
    """A tar that breaks off inside a member: the data itself is bad, retrying cannot help."""


@dataclass(slots=True)
class RawSample:
    """One sample as stored: image bytes undecoded, caption text, and the JSON fields if any."""

    key: str
    url: str
    image: bytes
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    image_ext: str = ""  # a shard's: the extension of the member the image came from
    row: int | None = None  # a parquet file's: the row the sample came from


def split_sources(spec: str) -> list[str]:
    """`a/{0..9}.tar::b/x.tar` -> ["a/{0..9}.tar", "b/x.tar"] (empty parts dropped)."""
    return [part.strip() for part in spec.split("::") if part.strip()]


def expand_urls(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/x.tar` -> the list of shard URLs; local files must exist."""
    urls: list[str] = []
    for part in split_sources(spec):
        urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]!r} (from {spec!r})"
        )
    return urls


def is_remote(url: str) -> bool:
    """A URL that is not a local path (a pipe command or a network location)."""
    return url.startswith(REMOTE_PREFIXES)


def to_raw_sample(sample: dict[str, Any]) -> RawSample:
    """A webdataset sample dict (extension -> bytes) -> RawSample, or SampleError naming why not."""
    key = str(sample.get("__key__", "?"))
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_ext is None:
        raise SampleError("missing_image", f"sample {key}: no image ({'/'.join(IMAGE_EXTENSIONS)})")
    raw_caption = next((sample[e] for e in CAPTION_EXTENSIONS if e in sample), None)
    if raw_caption is None:
        raise SampleError("missing_caption", f"sample {key}: no caption (.txt)")
    try:
        caption = raw_caption.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise SampleError("bad_caption", f"sample {key}: caption is not UTF-8 ({exc})") from None
    if not caption:
        raise SampleError("empty_caption", f"sample {key}: empty caption")
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (UnicodeDecodeError, json.JSONDecodeError):
            meta = {}  # the JSON is optional metadata; a broken one does not cost the sample
    url = str(sample.get("__url__", ""))
    return RawSample(key, url, sample[image_ext], caption, meta, image_ext=image_ext)


def raw_samples(samples: Iterable[dict[str, Any]], skipped: Counter[str]) -> Iterator[RawSample]:
    """Keep the usable samples; count the others in `skipped` by reason."""
    for sample in samples:
        if not sample:  # webdataset 1.x ends each shard with an empty marker sample
            continue
        try:
            yield to_raw_sample(sample)
        except SampleError as exc:
            skipped[exc.reason] += 1
            log.debug("skipped: %s", exc)


def _tar_samples(stream: IO[bytes], url: str, headers: list[int]) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into webdataset samples {"__key__", "__url__", ext: bytes}.

    A sample is handed on as soon as the next key's header is read, before that member's data:
    a tar that breaks off then costs only the sample it breaks in. `headers[0]` counts headers.
    """
    current: dict[str, Any] | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            headers[0] += 1
            match = _KEY_AND_EXT.match(member.name)
            if not member.isreg() or match is None or member.name.startswith("__"):
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is not None and (current["__key__"] != key or ext in current):
                yield current
                current = None
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
            tar.members = []  # type: ignore[attr-defined]  # stream mode keeps every header
    if current is not None:
        yield current


def _close(stream: IO[bytes]) -> None:
    """Close a shard stream; for `pipe:` this waits for the command and raises if it failed."""
    try:
        stream.close()
    except OSError as exc:
        raise UnreadableShardError(f"{exc}") from None


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """One pass over one shard. UnreadableShardError: cannot be opened, is no tar, or its pipe
    command failed; TruncatedShardError: the tar breaks off inside a member."""
    try:
        stream = gopen(url, "rb")
    except OSError as exc:
        raise UnreadableShardError(f"cannot open: {exc}") from None
    headers = [0]
    try:
        yield from _tar_samples(stream, url, headers)
    except (tarfile.TarError, EOFError) as exc:
        _close(stream)  # a failed pipe command explains a broken tar best: raised first
        if headers[0] == 0:
            raise UnreadableShardError(f"not a tar archive ({exc})") from None
        raise TruncatedShardError(
            f"the tar breaks off after {headers[0]} members ({exc})"
        ) from None
    except OSError as exc:  # e.g. a pipe command that exited with an error while being read
        _abandon(stream)
        raise UnreadableShardError(f"read failed: {exc}") from None
    except BaseException:  # the reader stopped early (generator closed) or was interrupted
        _abandon(stream)
        raise
    _close(stream)


def _abandon(stream: IO[bytes]) -> None:
    """Close a stream that is not read to its end; a pipe's command is killed, not waited for."""
    if isinstance(stream, Pipe):
        stream.proc.kill()
        stream.stream.close()
        stream.proc.wait()
    else:
        stream.close()


def read_shard(
    url: str, skipped: Counter[str], *, retries: int = DEFAULT_SHARD_RETRIES
) -> Iterator[dict[str, Any]]:
    """The samples of one shard, each once, retrying I/O failures up to `retries` times.

    A retry re-reads the shard and skips the samples already delivered. A shard still failing
    is skipped with a warning and counted as `failed_shard`; a tar that breaks off inside a
    member loses the rest of the shard, counted once as `truncated_member`. A key that came
    before in the shard is counted as `duplicate_key` and its sample dropped: two samples under
    one key would otherwise be two rows nobody can tell apart.
    """
    delivered = 0
    keys: set[str] = set()
    for attempt in range(retries + 1):
        try:
            for index, sample in enumerate(shard_samples(url)):
                if index < delivered:
                    continue
                delivered += 1
                if sample["__key__"] in keys:
                    skipped["duplicate_key"] += 1
                    log.debug("shard %s: key %s again; skipped", url, sample["__key__"])
                    continue
                keys.add(sample["__key__"])
                sample["__index__"] = index  # its place in the shard: with the shard, an id
                yield sample
            return
        except TruncatedShardError as exc:
            skipped["truncated_member"] += 1
            log.warning("shard %s: %s; the rest of the shard is skipped", url, exc)
            return
        except UnreadableShardError as exc:
            error = exc
            if attempt < retries:
                log.warning("shard %s failed (%s); retry %d of %d", url, exc, attempt + 1, retries)
    skipped["failed_shard"] += 1
    log.warning("skipping shard %s after %d attempts: %s", url, retries + 1, error)


def read_shards(
    urls: Iterable[str], skipped: Counter[str], *, retries: int = DEFAULT_SHARD_RETRIES
) -> Iterator[dict[str, Any]]:
    """The samples of several shards in order (see `read_shard`)."""
    for url in urls:
        yield from read_shard(url, skipped, retries=retries)


def iter_shards(
    spec: str, skipped: Counter[str], *, retries: int = DEFAULT_SHARD_RETRIES
) -> Iterator[RawSample]:
    """Read every sample of the shards in `spec` in order (no shuffling, one process)."""
    yield from raw_samples(read_shards(expand_urls(spec), skipped, retries=retries), skipped)


@dataclass(frozen=True, slots=True)
class SampleCount:
    """Samples stored in a list of shards, and where the number came from."""

    samples: int
    method: str  # e.g. "sizes.json", "img2dataset stats", "scan of 3 tars", or a mix


def count_samples(urls: list[str]) -> SampleCount | None:
    """Samples in `urls` from metadata next to the shards, or a scan; None for remote shards.

    Per shard, in order: `sizes.json` in its directory ({"NAME.tar": n}, as train.synth and
    open_clip write it), img2dataset's `NAME_stats.json` ("successes"), else a scan of the tar's
    headers (samples = distinct keys). Counts include samples that will later be skipped.
    """
    counts = _shard_counts(urls)
    if counts is None:
        return None
    methods = Counter(method for _, method in counts)
    total = sum(n for n, _ in counts)
    return SampleCount(total, ", ".join(f"{m} ({n} shards)" for m, n in methods.items()))


def shard_sizes(urls: list[str]) -> list[int] | None:
    """Samples in each of `urls`, found as `count_samples` finds them; None for remote shards."""
    counts = _shard_counts(urls)
    return None if counts is None else [n for n, _ in counts]


def _shard_counts(urls: list[str]) -> list[tuple[int, str]] | None:
    """(samples, where the number came from) per shard; None if any shard is remote."""
    if any(is_remote(u) for u in urls):
        return None
    sizes: dict[Path, dict[str, int]] = {}
    counts = []
    for url in urls:
        path = Path(url)
        if path.parent not in sizes:
            sizes[path.parent] = _read_sizes_json(path.parent / "sizes.json")
        counts.append(_shard_count(path, sizes[path.parent]))
    return counts


def _read_sizes_json(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
        return {str(k): int(v) for k, v in content.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring %s: not a {shard name: count} JSON object (%s)", path, exc)
        return {}


def _shard_count(path: Path, sizes: dict[str, int]) -> tuple[int, str]:
    if path.name in sizes:
        return sizes[path.name], "sizes.json"
    stats = path.with_name(path.name.removesuffix(".tar") + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"]), "img2dataset stats"
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s: no integer 'successes' (%s)", stats, exc)
    return _scan_keys(path), "tar scan"


def _scan_keys(path: Path) -> int:
    """Distinct sample keys in a local tar, from its headers only (member data is skipped)."""
    keys: set[str] = set()
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                match = _KEY_AND_EXT.match(member.name)
                if member.isreg() and match is not None:
                    keys.add(match.group(1))
    except (tarfile.TarError, OSError) as exc:
        log.warning("cannot scan %s for its sample count: %s", path, exc)
    return len(keys)
