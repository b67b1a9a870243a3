"""Data stages: shard lists, sources and weights, resampling, exact resume, bad data counted."""

import dataclasses
import io
import json
import logging
import multiprocessing
import os
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg
from PIL import Image

import train.data
from common.preprocess import ResizeLimit, image_transform, tokenizer
from common.shards import count_samples, expand_urls, iter_shards, raw_samples, read_shard
from train.config import DataConfig
from train.data import DataPosition, EpochData, TrainBatches, WorkerEnd
from train.sampling import (
    Reader,
    data_sources,
    shuffled_shards,
    split_by_rank,
    worker_samples,
)

TRANSFORM = image_transform(PreprocessCfg(size=32), train=True)  # random crops: seeded per sample
TOKENIZE = tokenizer("duet-micro")
RESIZE = ResizeLimit(PreprocessCfg(size=32))


def jpeg(color: tuple[int, int, int], size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
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


def good(key: str, caption: bytes = b"a red square") -> dict:
    return {"__key__": key, "jpg": jpeg((200, 10, 10)), "txt": caption, "json": b"{}"}


def varied(key: str, i: int) -> dict:
    """A good sample with an image of noise (so random crops differ) and its own caption."""
    pixels = np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return {"__key__": key, "jpg": buf.getvalue(), "txt": f"sample {key}".encode()}


def cut_inside(path: Path, member: str) -> None:
    """Truncate the tar at `path` half-way through the data of `member`."""
    whole = path.read_bytes()
    path.write_bytes(whole[: whole.index(member.encode()) + 512 + 300])


def shards(tmp_path: Path, name: str, count: int, per_shard: int) -> str:
    """`count` shards of `per_shard` varied samples; returns their brace pattern."""
    for s in range(count):
        samples = [varied(f"{name}{s:02d}{i:03d}", s * per_shard + i) for i in range(per_shard)]
        write_shard(tmp_path / f"{name}-{s}.tar", samples)
    return f"{tmp_path}/{name}-{{0..{count - 1}}}.tar"


def epoch_items(cfg: DataConfig) -> list:
    """Everything one in-process worker delivers in epoch 0: its batches, then its WorkerEnd."""
    position = DataPosition.start_of(0, 1)
    data = EpochData(
        cfg, data_sources(cfg), TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1,
        position=position, batch_quota=None,
    )  # fmt: skip
    return list(data)


def total_skipped(items: list) -> Counter:
    return sum((Counter(item.skipped) for item in items), Counter())


# -- shard lists, order and sources ------------------------------------------------------------


def test_expand_urls_braces_and_several_sources(tmp_path):
    for i in range(3):
        write_shard(tmp_path / f"a-{i}.tar", [good("0")])
    write_shard(tmp_path / "b.tar", [good("0")])
    urls = expand_urls(f"{tmp_path}/a-{{0..2}}.tar::{tmp_path}/b.tar")
    assert urls == [f"{tmp_path}/a-{i}.tar" for i in range(3)] + [f"{tmp_path}/b.tar"]
    assert expand_urls("pipe:cat /nowhere.tar") == ["pipe:cat /nowhere.tar"]  # not checked
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


def test_sources_are_interleaved_in_proportion_to_their_weights(tmp_path):
    a = shards(tmp_path, "a", 2, 20)
    b = shards(tmp_path, "b", 2, 20)
    cfg = DataConfig(
        train_shards=f"{a}::{b}", train_weights=(3.0, 1.0), resampled=True, shuffle_buffer=50
    )
    reader = Reader(seed=0, epoch=0, rank=0, world_size=1, worker=0, workers=1)
    stream = worker_samples(cfg, data_sources(cfg), reader, Counter())
    sources = Counter(next(stream)["__key__"][0] for _ in range(4000))
    assert sources["a"] / 4000 == pytest.approx(0.75, abs=0.03), sources

    # epoch mode: the weights set the interleaving; every sample is still read once per epoch
    cfg = DataConfig(train_shards=f"{a}::{b}", train_weights=(3.0, 1.0), shuffle_buffer=0)
    keys = [s["__key__"] for s in worker_samples(cfg, data_sources(cfg), reader, Counter())]
    assert len(keys) == 80 and len(set(keys)) == 80
    first_half = Counter(k[0] for k in keys[:40])
    assert first_half["a"] > first_half["b"]  # a is drawn three times as often while both last


def test_bad_weights_fail_clearly():
    with pytest.raises(ValueError, match="data.train_weights: has 1 weights for 2 '::' sources"):
        DataConfig(train_shards="a.tar::b.tar", train_weights=(1.0,))
    with pytest.raises(ValueError, match="data.train_weights: every weight must be"):
        DataConfig(train_shards="a.tar::b.tar", train_weights=(1.0, 0.0))


# -- sample accounting -------------------------------------------------------------------------


def test_samples_per_epoch_from_sizes_json_img2dataset_stats_or_a_scan(tmp_path):
    synth = tmp_path / "synth"
    synth.mkdir()
    write_shard(synth / "shard-0.tar", [good("0"), good("1")])
    (synth / "sizes.json").write_text(json.dumps({"shard-0.tar": 250}))  # train.synth's layout
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    write_shard(i2d / "00000.tar", [good("0")])
    (i2d / "00000_stats.json").write_text(json.dumps({"count": 12, "successes": 9}))
    bare = write_shard(tmp_path / "bare.tar", [good("0"), {"__key__": "1", "txt": b"x"}])

    counted = count_samples([str(synth / "shard-0.tar"), str(i2d / "00000.tar"), str(bare)])
    assert counted is not None and counted.samples == 250 + 9 + 2
    assert (
        counted.method == "sizes.json (1 shards), img2dataset stats (1 shards), tar scan (1 shards)"
    )
    assert count_samples(["pipe:cat x.tar"]) is None


def test_resampled_epochs_have_a_fixed_number_of_steps_and_are_logged(tmp_path, caplog):
    cfg = DataConfig(
        train_shards=shards(tmp_path, "a", 2, 10),
        resampled=True,
        samples_per_epoch=30,
        batch_size_per_rank=4,
        workers=0,
        shuffle_buffer=10,
    )
    with caplog.at_level(logging.INFO, logger="train.data"):
        batches = TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)
        stream = iter(batches)
        for _ in range(7):  # 30 // 4 = 7 steps per epoch
            next(stream)
        assert batches.epoch == 0
        next(stream)
        assert batches.epoch == 1
    assert (
        "resampled" in caplog.text
        and "30 samples per epoch (data.samples_per_epoch)" in caplog.text
    )
    assert "7 steps per epoch at global batch 4" in caplog.text
    assert "finished data epoch 0 (7 batches" in caplog.text

    remote = DataConfig(train_shards="pipe:cat x.tar", resampled=True)
    with pytest.raises(ValueError, match="needs data.samples_per_epoch"):
        TrainBatches(remote, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)


def test_sample_ids_name_each_training_sample_the_same_in_every_epoch(synth_dir: Path):
    """loss.negatives=global's ids: shard offset + place in the shard, in the order the spec
    lists the shards; every sample of an epoch once, whichever worker reads it."""
    spec = f"{synth_dir}/train/shard-{{000000..000001}}.tar"
    cfg = DataConfig(train_shards=spec, batch_size_per_rank=50, workers=2, shuffle_buffer=100)
    batches = TrainBatches(
        cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1, sample_ids=True
    )
    assert batches.num_samples == 500
    captions = [sample.caption for sample in iter_shards(spec, Counter())]  # in id order
    stream = iter(batches)
    epochs = []
    for _ in range(2):  # 2 workers x 1 shard x 5 batches of 50
        epoch = [next(stream) for _ in range(10)]
        for batch in epoch[:2]:
            assert batch.ids is not None
            assert torch.equal(batch.tokens, TOKENIZE([captions[i] for i in batch.ids.tolist()]))
        epochs.append(torch.cat([b.ids for b in epoch if b.ids is not None]))
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) == list(range(500))
    assert not torch.equal(epochs[0], epochs[1])  # the same samples in another order

    remote = DataConfig(train_shards="pipe:cat x.tar", resampled=True, samples_per_epoch=640)
    with pytest.raises(ValueError, match="local shards only"):
        TrainBatches(
            remote, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1, sample_ids=True
        )


# -- exact resume ------------------------------------------------------------------------------


def take(batches: TrainBatches, n: int) -> list:
    stream = iter(batches)
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize(
    ("workers", "resampled", "stop_after"),
    [(2, False, 7), (0, True, 5)],
    ids=["two-workers-epoch-mode", "in-process-resampled"],
)
def test_a_resumed_stream_continues_with_identical_batches(
    tmp_path, workers, resampled, stop_after
):
    a = shards(tmp_path, "a", 3, 15)
    b = shards(tmp_path, "b", 2, 15)
    bad = {"__key__": "bad", "jpg": b"not a jpeg", "txt": b"a caption"}
    write_shard(tmp_path / "a-1.tar", [*[varied(f"x{i}", i) for i in range(14)], bad])
    cut_inside(tmp_path / "b-0.tar", "b00004.jpg")  # a shard error met early, before the stop
    cfg = DataConfig(
        train_shards=f"{a}::{b}",
        train_weights=(2.0, 1.0),
        resampled=resampled,
        samples_per_epoch=48,
        batch_size_per_rank=4,
        workers=workers,
        shuffle_buffer=8,
    )

    def make(state: dict | None = None) -> TrainBatches:
        return TrainBatches(
            cfg, TRANSFORM, TOKENIZE, RESIZE, seed=3, rank=0, world_size=1, state=state
        )

    # an odd number of batches: the next one is due from the second worker
    first = make()
    before = take(first, stop_after)
    state = first.state_dict()
    uninterrupted = take(make(), 20)  # into the next epoch (resampled: 12 steps, else ~17)
    resumed = take(make(state), 20 - stop_after)
    for i, (want, got) in enumerate(zip(uninterrupted[stop_after:], resumed, strict=True)):
        assert torch.equal(want.images, got.images), f"batch {stop_after + i} differs"
        assert torch.equal(want.tokens, got.tokens), f"batch {stop_after + i} differs"
        assert want.skipped == got.skipped
    assert [b.skipped for b in before] == [b.skipped for b in uninterrupted[:stop_after]]
    assert total_skipped(uninterrupted)["truncated_member"] >= 1


def test_replayed_samples_are_not_decoded(tmp_path, monkeypatch):
    cfg = DataConfig(
        train_shards=shards(tmp_path, "a", 1, 40),
        batch_size_per_rank=4,
        workers=0,
        shuffle_buffer=8,
    )
    first = TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)
    take(first, 6)
    decoded = []
    real_decode = train.data.decode_or_skip
    monkeypatch.setattr(
        train.data,
        "decode_or_skip",
        lambda data, *args, **kw: decoded.append(1) or real_decode(data, *args, **kw),
    )
    resumed = TrainBatches(
        cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1, state=first.state_dict()
    )
    take(resumed, 2)
    assert len(decoded) == 2 * 4  # the 24 replayed samples were skipped undecoded


def test_a_changed_data_setup_resumes_at_the_next_epoch(tmp_path, caplog):
    cfg = DataConfig(train_shards=shards(tmp_path, "a", 1, 20), batch_size_per_rank=4, workers=0)
    first = TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)
    take(first, 2)
    changed = dataclasses.replace(cfg, shuffle_buffer=7)
    with caplog.at_level(logging.WARNING):
        resumed = TrainBatches(
            changed,
            TRANSFORM,
            TOKENIZE,
            RESIZE,
            seed=0,
            rank=0,
            world_size=1,
            state=first.state_dict(),
        )
    assert resumed.position == DataPosition.start_of(1, 1)
    assert "shuffle_buffer" in caplog.text and "restarts at data epoch 1" in caplog.text


# -- bad data ----------------------------------------------------------------------------------


def test_bad_samples_and_shards_are_skipped_and_counted_by_kind(tmp_path):
    mixed = write_shard(
        tmp_path / "bad.tar",
        [
            good("000"),
            {"__key__": "001", "jpg": b"\xff\xd8 this is not a jpeg", "txt": b"broken image"},
            {"__key__": "002", "jpg": jpeg((0, 0, 255))},  # no caption
            {"__key__": "003", "jpg": jpeg((0, 255, 0)), "txt": b"   "},  # empty caption
            {"__key__": "004", "txt": b"a caption without image"},
            {"__key__": "005", "jpg": jpeg((0, 255, 0), size=80), "txt": b"too many pixels"},
            {"__key__": "006", "jpg": jpeg((9, 9, 9)), "txt": b"\xff\xfe not utf-8"},
            good("007"),
        ],
    )
    cut = write_shard(tmp_path / "cut.tar", [good("c0"), good("c1"), good("c2")])
    cut_inside(cut, "c1.jpg")
    not_a_tar = tmp_path / "junk.tar"
    not_a_tar.write_bytes(b"this is not a tar archive" * 40)
    cfg = DataConfig(
        train_shards=f"{mixed}::{cut}::{not_a_tar}::pipe:exit 3",
        batch_size_per_rank=1,
        workers=0,
        shuffle_buffer=0,
        max_image_pixels=50 * 50,  # the 80 x 80 image is refused from its header
        shard_retries=1,
    )
    items = epoch_items(cfg)
    assert isinstance(items[-1], WorkerEnd)
    assert len(items) - 1 == 3  # 000, 007 and c0: c1 is cut, c2 lost with it
    assert total_skipped(items) == {
        "corrupt_image": 1,
        "missing_caption": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "image_too_large": 1,
        "bad_caption": 1,
        "truncated_member": 1,
        "failed_shard": 2,  # junk.tar and the failing pipe command
    }


def test_counts_come_back_from_worker_processes(tmp_path):
    first = write_shard(
        tmp_path / "a.tar", [good("0"), {"__key__": "1", "jpg": b"no image", "txt": b"x"}]
    )
    second = write_shard(
        tmp_path / "b.tar", [good("2"), good("3"), {"__key__": "4", "jpg": jpeg((1, 2, 3))}]
    )
    cfg = DataConfig(
        train_shards=f"{first}::{second}", batch_size_per_rank=1, workers=2, shuffle_buffer=0
    )
    # one epoch has 3 good samples; skips after a worker's last batch ride on the next batch
    batches = take(TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1), 4)
    assert total_skipped(batches) == {"corrupt_image": 1, "missing_caption": 1}


def test_pipe_urls_read_shards_and_failing_commands_are_retried(tmp_path, caplog):
    shard = write_shard(tmp_path / "a.tar", [good(str(i)) for i in range(6)])
    keys = [str(i) for i in range(6)]
    skipped: Counter[str] = Counter()
    assert [s.key for s in iter_shards(f"pipe:cat {shard}", skipped)] == keys and not skipped

    # fails on the first attempt half-way through, then works: every sample exactly once
    mark = tmp_path / "tried"
    flaky = (
        f"pipe:if [ -e {mark} ]; then cat {shard}; "
        f"else touch {mark}; head -c 6000 {shard}; exit 1; fi"
    )
    with caplog.at_level(logging.WARNING):
        assert [s["__key__"] for s in read_shard(flaky, skipped, retries=2)] == keys
    assert not skipped and "retry 1 of 2" in caplog.text

    # always fails: 1 + retries attempts, then skipped with a warning and counted
    attempts = tmp_path / "attempts"
    broken = f"pipe:echo x >> {attempts}; exit 1"
    assert list(read_shard(broken, skipped, retries=2)) == []
    assert skipped == {"failed_shard": 1} and len(attempts.read_text().split()) == 3
    assert f"skipping shard {broken} after 3 attempts" in caplog.text


def test_stream_continues_into_the_next_epoch(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [good(str(i)) for i in range(5)])
    cfg = DataConfig(train_shards=str(shard), batch_size_per_rank=2, workers=0, shuffle_buffer=0)
    batches = TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)
    for batch in take(batches, 5):  # 2 full batches per epoch (the 5th sample is dropped)
        assert batch.images.shape == (2, 3, 32, 32) and batch.tokens.shape == (2, 20)
    assert batches.epoch == 2


def test_too_few_shards_or_samples_fail_clearly(tmp_path):
    shard = write_shard(tmp_path / "a.tar", [good("0")])
    cfg = DataConfig(train_shards=str(shard), batch_size_per_rank=4, workers=0)
    with pytest.raises(ValueError, match="1 shards for 2 ranks"):
        TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=2)
    with pytest.raises(RuntimeError, match="produced no full batch"):
        next(iter(TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)))


def started_since(others: set[int]) -> list[multiprocessing.process.BaseProcess]:
    """Live child processes (DataLoader workers) other than those in `others`."""
    return [child for child in multiprocessing.active_children() if child.pid not in others]


@pytest.mark.parametrize("niceness", [0, 7])
def test_data_workers_run_at_the_configured_niceness(tmp_path, niceness):
    cfg = DataConfig(
        train_shards=shards(tmp_path, "n", 1, 40),  # 20 steps: no next epoch started yet
        batch_size_per_rank=2,
        workers=1,
        worker_niceness=niceness,
        shuffle_buffer=0,
    )
    own = os.getpriority(os.PRIO_PROCESS, 0)
    others = {child.pid for child in multiprocessing.active_children()}
    stream = iter(TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1))
    next(stream)  # the worker has started and made a batch
    (worker,) = started_since(others)
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == min(19, own + niceness)
    stream.close()  # shuts the DataLoader's worker down
    assert not started_since(others)


def test_the_next_epochs_worker_starts_before_the_epoch_ends_and_streams_the_same(tmp_path):
    cfg = DataConfig(
        train_shards=shards(tmp_path, "e", 2, 20), batch_size_per_rank=2, workers=1
    )  # 20 steps per epoch; the next epoch's worker starts at batch 20 - (4 + 1) = 15
    batches = TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1)
    others = {child.pid for child in multiprocessing.active_children()}
    stream = iter(batches)
    for _ in range(14):
        next(stream)
    assert len(started_since(others)) == 1
    next(stream)  # batch 15: the next epoch's worker starts now, this one's still delivering
    assert len(started_since(others)) == 2
    rest_of_epoch_0 = [next(stream) for _ in range(5)]
    epoch_1 = [next(stream) for _ in range(20)]
    assert batches.epoch == 1 and sum(b.worker == 0 for b in rest_of_epoch_0) == 5
    stream.close()

    # the early-started epoch is the one a stream begun at that epoch delivers
    fresh = take(
        TrainBatches(cfg, TRANSFORM, TOKENIZE, RESIZE, seed=0, rank=0, world_size=1, start_epoch=1),
        20,
    )
    for early, reference in zip(epoch_1, fresh, strict=True):
        torch.testing.assert_close(early.images, reference.images)
        assert torch.equal(early.tokens, reference.tokens)
