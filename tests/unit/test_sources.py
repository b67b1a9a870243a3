"""serve.indexing.sources and the index builder over picture folders and img2dataset parquet."""

from __future__ import annotations

import io
import stat
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from common.artifact import write_artifact
from common.model import build_model
from serve.indexing import build as build_index_cli
from serve.indexing.build import build_index
from serve.indexing.index import SearchIndex
from serve.indexing.sources import UnsupportedInputError, list_parts, read_part
from train import synth

FORMATS = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF", ".bmp": "BMP"}


def image_bytes(color: tuple[int, int, int], fmt: str = "PNG", size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def photo_folder(root: Path) -> Path:
    """Nested folders of pictures in five formats, some with captions and metadata, one corrupt
    file, one hidden file and a file that is no image."""
    (root / "2024" / "summer").mkdir(parents=True)
    (root / ".thumbnails").mkdir()
    for i, (suffix, fmt) in enumerate(FORMATS.items()):
        folder = root / "2024" / "summer" if i % 2 else root
        (folder / f"photo{i}{suffix}").write_bytes(image_bytes((40 * i, 90, 200 - 30 * i), fmt))
    (root / "photo0.txt").write_text("a blue picture\n")
    (root / "photo0.json").write_text('{"camera": "x100"}')
    (root / "2024" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / ".thumbnails" / "t.png").write_bytes(image_bytes((1, 2, 3)))
    (root / "notes.txt").write_text("not a picture")
    Image.new("RGB", (30, 40), (9, 9, 9)).save(root / "scan.TIFF", format="TIFF")
    return root


def img2dataset_parquet(path: Path, count: int = 5, with_images: bool = True) -> Path:
    """A file as img2dataset --output_format parquet writes it: key, jpg, txt and metadata;
    a failed download is a row with null bytes, and one image is corrupt."""
    rows = {
        "key": [f"{i:09d}" for i in range(count)],
        "url": [f"https://example.com/{i}.jpg" for i in range(count)],
        "status": ["success"] * count,
        "width": [40] * count,
        "txt": [f"caption {i}" for i in range(count)],
    }
    if with_images:
        images = [image_bytes((50 * i % 255, 10, 10), "JPEG") for i in range(count)]
        images[1] = None  # a failed download
        images[2] = b"corrupt"
        rows["jpg"] = images
    pq.write_table(pa.table(rows), path, row_group_size=2)
    return path


def test_a_folder_is_read_recursively_with_optional_captions_and_metadata(tmp_path: Path):
    folder = photo_folder(tmp_path / "photos")
    skipped: Counter[str] = Counter()
    samples = [s for part in list_parts(str(folder)) for s in read_part(part, skipped)]
    sources = [s.meta["source"] for s in samples]
    assert sources == sorted(sources) and len(samples) == 7  # 5 formats + tiff + broken file
    assert "notes.txt" not in sources and not any(".thumbnails" in s for s in sources)
    first = next(s for s in samples if s.meta["source"] == "photo0.jpg")
    assert first.caption == "a blue picture" and first.meta["camera"] == "x100"
    assert first.key == "photo0"
    assert next(s for s in samples if s.key == "2024/summer/photo1").caption == ""


def test_parts_split_big_folders_and_keep_order(tmp_path: Path, monkeypatch):
    import serve.indexing.sources

    folder = photo_folder(tmp_path / "photos")
    monkeypatch.setattr(serve.indexing.sources, "FOLDER_PART_FILES", 3)
    parts = list_parts(f"{folder}::{folder}")
    assert [len(p.files) for p in parts] == [3, 3, 1, 3, 3, 1]


def test_a_folder_a_thousand_levels_deep_is_walked():
    # Not under pytest's tmp_path: its clean-up (shutil.rmtree) recurses once per level too, and
    # would fail on this tree in a later session if this test were killed before removing it.
    top = Path(tempfile.mkdtemp(prefix="duet-deep-"))
    deepest = top
    try:
        for _ in range(1000):  # os.walk recursed once per level: RecursionError at ~990
            deepest = deepest / "d"
            deepest.mkdir()  # one by one: mkdir(parents=True) recurses too
        (deepest / "x.png").write_bytes(image_bytes((1, 2, 3)))
        (top / "top.png").write_bytes(image_bytes((3, 2, 1)))
        samples = [s for part in list_parts(str(top)) for s in read_part(part, Counter())]
        assert [s.key for s in samples] == ["d/" * 1000 + "x", "top"]
    finally:
        while True:  # bottom-up, one level at a time
            for path in deepest.iterdir():
                if not path.is_dir():
                    path.unlink()
            deepest.rmdir()
            if deepest == top:
                break
            deepest = deepest.parent


def test_files_sharing_a_stem_get_distinct_keys_and_unique_stems_keep_theirs(tmp_path: Path):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    names = ["china.bmp", "china.webp", "china.png", "2024/china.png", "tokyo.jpg", "a.png.jpg"]
    names += ["a.png", "a.webp"]  # a.png's key is then "a.png": a.png.jpg's stem
    for name in names:
        fmt = FORMATS[Path(name).suffix]
        (folder / name).write_bytes(image_bytes((9, 9, 9), fmt))
    (folder / "china.txt").write_text("the great wall")
    skipped: Counter[str] = Counter()
    samples = [s for p in list_parts(str(folder)) for s in read_part(p, skipped)]
    keys = {s.meta["source"]: s.key for s in samples}
    assert keys == {
        "2024/china.png": "2024/china",
        "a.png": "a.png",
        "a.png.jpg": "a.png.jpg",
        "a.webp": "a.webp",
        "china.bmp": "china.bmp",
        "china.png": "china.png",
        "china.webp": "china.webp",
        "tokyo.jpg": "tokyo",
    }
    assert {s.caption for s in samples if s.key.startswith("china")} == {"the great wall"}
    assert not skipped


def test_parquet_rows_become_samples_and_bad_rows_are_counted(tmp_path: Path):
    path = img2dataset_parquet(tmp_path / "00000.parquet")
    skipped: Counter[str] = Counter()
    (part,) = list_parts(str(path))
    samples = list(read_part(part, skipped))
    assert [s.key for s in samples] == ["000000000", "000000002", "000000003", "000000004"]
    assert skipped == {"missing_image": 1}  # the corrupt image is the decoder's to count
    assert samples[0].caption == "caption 0" and samples[0].meta["url"].endswith("/0.jpg")
    assert "jpg" not in samples[0].meta and "txt" not in samples[0].meta


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.with_suffix(".zip").write_bytes(b"PK\x03\x04rest"), "a zip archive"),
        (lambda p: p.with_suffix(".jpg").write_bytes(image_bytes((1, 1, 1), "JPEG")), "JPEG"),
        (lambda p: p.with_suffix(".bin").write_bytes(b"\x00" * 600), r"unknown format \(\.bin\)"),
    ],
)
def test_unsupported_inputs_get_one_line_naming_the_format(tmp_path: Path, make, message: str):
    make(tmp_path / "input")
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(UnsupportedInputError, match=message):
        list_parts(str(path))


def test_metadata_only_parquet_and_empty_folders_are_refused(tmp_path: Path):
    path = img2dataset_parquet(tmp_path / "00000.parquet", with_images=False)
    (part,) = list_parts(str(path))
    with pytest.raises(UnsupportedInputError, match="without image bytes.*index the shards"):
        list(read_part(part, Counter()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedInputError, match="no image files"):
        list_parts(str(tmp_path / "empty"))


def test_build_index_from_a_folder_and_parquet_skips_and_counts_bad_files(tmp_path: Path, capsys):
    artifact = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    folder = photo_folder(tmp_path / "photos")
    good = img2dataset_parquet(tmp_path / "00000.parquet")
    truncated = tmp_path / "00001.parquet"
    truncated.write_bytes(good.read_bytes()[:200])  # starts like parquet, breaks off
    data = f"{folder}::{good}::{truncated}"
    argv = ["--model", str(artifact), "--data", data, "--out", str(tmp_path / "index")]
    assert build_index_cli.main([*argv, "--batch-size", "4", "--workers", "0"]) == 0
    # 7 - 2 pictures (a broken file; a TIFF, not an accepted format), 5 - 2 parquet rows
    assert "indexed 8 images" in capsys.readouterr().out
    for path in [tmp_path / "index", *(tmp_path / "index").rglob("*")]:  # another user may serve it
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    index = SearchIndex.load(tmp_path / "index")
    assert index.manifest["skipped"] == {
        "corrupt_image": 2,
        "unsupported_format": 1,
        "missing_image": 1,
        "failed_shard": 1,
    }
    rows = index.rows(list(range(index.count)))
    assert rows[0].meta["source"] == "2024/summer/photo1.png"
    assert rows[7].meta["url"] == "https://example.com/4.jpg"
    index.close()
    bad = ["--model", str(artifact), "--data", str(tmp_path / "x.zip"), "--out", "x"]
    (tmp_path / "x.zip").write_bytes(b"PK\x03\x04")
    assert build_index_cli.main(bad) == 2
    assert "a zip archive" in capsys.readouterr().err
    with pytest.raises(UnsupportedInputError):
        build_index(artifact, str(tmp_path / "x.zip"), tmp_path / "never")


def test_the_progress_bar_counts_a_folders_files_with_rate_and_eta(tmp_path: Path, capsys):
    artifact = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    folder = photo_folder(tmp_path / "photos")  # 7 image files: 2 of them skipped
    build_index(artifact, str(folder), tmp_path / "index", batch_size=2, progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    last = [line for line in bar if line.startswith("embedding")][-1]
    assert "100%" in last and "7/7" in last and "img/s" in last and "images=5" in last, last
    assert any("<" in line and "img/s" in line for line in bar)  # elapsed<remaining: the ETA


def img2dataset_output(root: Path, output_format: str, shard_count: int = 2) -> Path:
    """A folder as img2dataset leaves it: numbered shards (webdataset: .tar with a metadata-only
    .parquet beside each; parquet: .parquet with the images), and a _stats.json per shard."""
    root.mkdir()
    for shard in range(shard_count):
        name = f"{shard:05d}"
        if output_format == "webdataset":
            made = root.parent / f"synth{shard}"
            synth.generate(
                made, train_shards=1, samples_per_shard=3, seed=shard, val_samples=1, image_size=32
            )
            (made / "train" / "shard-000000.tar").rename(root / f"{name}.tar")
        img2dataset_parquet(root / f"{name}.parquet", with_images=output_format == "parquet")
        (root / f"{name}_stats.json").write_text('{"successes": 3}')
    return root


@pytest.mark.parametrize(
    ("output_format", "kind"), [("webdataset", "shard"), ("parquet", "parquet")]
)
def test_an_img2dataset_output_folder_is_read_as_its_shards(
    tmp_path: Path, output_format: str, kind: str
):
    folder = img2dataset_output(tmp_path / "out", output_format)
    parts = list_parts(str(folder))
    suffix = ".tar" if kind == "shard" else ".parquet"
    assert [(p.kind, Path(p.location).name) for p in parts] == [
        (kind, f"00000{suffix}"),
        (kind, f"00001{suffix}"),
    ]
    assert all(list(read_part(part, Counter())) for part in parts)  # each gives samples


def test_a_glob_is_expanded_and_one_that_matches_nothing_suggests_braces(tmp_path: Path):
    folder = img2dataset_output(tmp_path / "out", "parquet", shard_count=3)
    parts = list_parts(f"{folder}/*.parquet")
    assert [Path(p.location).name for p in parts] == [f"0000{i}.parquet" for i in range(3)]
    with pytest.raises(FileNotFoundError, match=r"matches no file.*\{00000\.\.00009\}\.tar"):
        list_parts(f"{folder}/*.tar")
    with pytest.raises(UnsupportedInputError, match=r"braces.*/\{00000\.\.00009\}\.parquet"):
        list_parts("https://example.com/data/*.parquet")
