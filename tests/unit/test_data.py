"""Data stages: shard lists, splits, the end-of-shard marker, bad samples skipped and counted."""

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from open_clip.transform import PreprocessCfg
from PIL import Image

from common.preprocess import image_transform, tokenizer
from common.shards import expand_urls, iter_shards, raw_samples
from train.config import DataConfig
from train.data import TrainBatches, epoch_pipeline, shuffled_shards, split_by_rank

TRANSFORM = image_transform(PreprocessCfg(size=32), train=True)
TOKENIZE = tokenizer("duet-micro")


def jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """samples: [{"__key__": ..., "jpg": ..., "txt": ...}] -> a tar in webdataset layout."""
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str) -> dict:
    return {"__key__": key, "jpg": jpeg((200, 10, 10)), "txt": b"a red square", "json": b"{}"}


@pytest.fixture
def shard_with_bad_samples(tmp_path: Path) -> Path:
    # each bad sample is followed by a good one, so its count rides on a batch
    return write_shard(
        tmp_path / "bad.tar",
        [
            good("000"),
            {"__key__": "001", "jpg": b"\xff\xd8 this is not a jpeg", "txt": b"broken image"},
            good("002"),
            {"__key__": "003", "jpg": jpeg((0, 0, 255))},  # no caption
            good("004"),
            {"__key__": "005", "jpg": jpeg((0, 255, 0)), "txt": b"   "},  # empty caption
            good("006"),
            {"__key__": "007", "txt": b"a caption without image"},
            good("008"),
        ],
    )


def test_expand_urls_braces_and_several_sources(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"a-{i}.tar", [good("0")])
    write_shard(tmp_path / "b.tar", [good("0")])
    urls = expand_urls(f"{tmp_path}/a-{{0..2}}.tar::{tmp_path}/b.tar")
    assert urls == [f"{tmp_path}/a-{i}.tar" for i in range(3)] + [f"{tmp_path}/b.tar"]
    with pytest.raises(FileNotFoundError, match="1 of 2 shards not found"):
        expand_urls(f"{tmp_path}/a-0.tar::{tmp_path}/missing.tar")
    with pytest.raises(ValueError, match="no shards"):
        expand_urls(" :: ")


def test_shard_order_is_deterministic_per_epoch_and_ranks_are_disjoint():
    urls = [f"s{i}" for i in range(10)]
    assert shuffled_shards(urls, 0, 1) == shuffled_shards(urls, 0, 1)
    assert shuffled_shards(urls, 0, 1) != shuffled_shards(urls, 0, 2)
    parts = [split_by_rank(shuffled_shards(urls, 0, 1), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(urls)
    assert all(len(p) in (3, 4) for p in parts)


def test_end_of_shard_markers_do_not_end_or_break_the_stream(tmp_path):
    a = write_shard(tmp_path / "a.tar", [good("a0"), good("a1")])
    b = write_shard(tmp_path / "b.tar", [good("b0")])
    skipped: Counter[str] = Counter()
    keys = [s.key for s in iter_shards(f"{a}::{b}", skipped)]
    assert keys == ["a0", "a1", "b0"] and not skipped
    # the marker itself ({} in webdataset 1.x) is dropped, not counted as a bad sample
    assert list(raw_samples([{}, {}], skipped)) == [] and not skipped


def test_bad_samples_are_skipped_and_counted(shard_with_bad_samples):
    cfg = DataConfig(
        train_shards=str(shard_with_bad_samples), batch_size_per_rank=1, workers=0, shuffle_buffer=0
    )
    pipeline = epoch_pipeline(
        cfg,
        [str(shard_with_bad_samples)],
        TRANSFORM,
        TOKENIZE,
        seed=0,
        epoch=0,
        rank=0,
        world_size=1,
    )
    batches = list(pipeline)
    assert len(batches) == 5
    assert batches[0].images.shape == (1, 3, 32, 32) and batches[0].tokens.shape == (1, 20)
    total = sum((Counter(b.skipped) for b in batches), Counter())
    assert total == {
        "corrupt_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "missing_image": 1,
    }


def test_counts_come_back_from_worker_processes(tmp_path, shard_with_bad_samples):
    second = write_shard(
        tmp_path / "bad2.tar", [{"__key__": "x", "jpg": b"not an image", "txt": b"x"}, good("y")]
    )
    cfg = DataConfig(
        train_shards=f"{shard_with_bad_samples}::{second}",
        batch_size_per_rank=1,
        workers=2,
        shuffle_buffer=0,
    )
    stream = iter(TrainBatches(cfg, TRANSFORM, TOKENIZE, seed=0, rank=0, world_size=1))
    batches = [next(stream) for _ in range(6)]  # one epoch: 5 + 1 good samples
    total = sum((Counter(b.skipped) for b in batches), Counter())
    assert total["corrupt_image"] == 2 and sum(total.values()) == 5


def test_stream_continues_into_the_next_epoch(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [good(str(i)) for i in range(5)])
    cfg = DataConfig(train_shards=str(shard), batch_size_per_rank=2, workers=0, shuffle_buffer=0)
    batches = TrainBatches(cfg, TRANSFORM, TOKENIZE, seed=0, rank=0, world_size=1)
    stream = iter(batches)
    for _ in range(5):  # 2 full batches per epoch (the 5th sample is dropped, not padded)
        assert next(stream).images.shape[0] == 2
    assert batches.epoch == 2


def test_too_few_shards_or_samples_fail_clearly(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [good("0")])
    cfg = DataConfig(train_shards=str(shard), batch_size_per_rank=4, workers=0)
    with pytest.raises(ValueError, match="1 shards for 2 ranks"):
        TrainBatches(cfg, TRANSFORM, TOKENIZE, seed=0, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="produced no full batch"):
        next(iter(TrainBatches(cfg, TRANSFORM, TOKENIZE, seed=0, rank=0, world_size=1)))
