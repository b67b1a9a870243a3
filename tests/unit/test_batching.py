"""Dynamic batching: concurrent callers share forward passes, get their own rows; bounded queue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from common.artifact import load_artifact
from common.preprocess import load_image
from serve import batching
from serve.batching import EncodeBatcher, Overloaded
from serve.encoder import Encoder
from tests.serve_support import make_artifact, make_shard, read_samples

T = TypeVar("T")
# Every wait on the worker thread is bounded: its jobs take milliseconds, so WAIT_S is far above
# a loaded machine's time and a dead or stuck worker fails the test instead of hanging it.
WAIT_S = 30.0

TEXTS = [
    f"a {size} {color} circle"
    for size in ("small", "large")
    for color in ("red", "blue", "green", "pink")
]


def run_bounded(work: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(work)`, failing if the batcher has not answered within WAIT_S."""

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(work, WAIT_S)
        except TimeoutError:
            raise AssertionError(f"the encoder thread did not answer in {WAIT_S:.0f} s") from None

    return asyncio.run(bounded())


class Recorder:
    """A BatchObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, int, int]] = []
        self.depths: list[int] = []
        self.jobs: list[tuple[str, float, float]] = []

    def observe_batch(self, kind: str, items: int, jobs: int) -> None:
        self.batches.append((kind, items, jobs))

    def set_queue_depth(self, items: int) -> None:
        self.depths.append(items)

    def observe_job(self, kind: str, queue_s: float, inference_s: float) -> None:
        self.jobs.append((kind, queue_s, inference_s))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    return Encoder(load_artifact(make_artifact(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list:
    shard = make_shard(tmp_path_factory.mktemp("synth"), samples=6)
    return [load_image(sample.image) for sample in read_samples(shard)]


@pytest.fixture(scope="module")
def pixels(encoder: Encoder, images: list) -> list[torch.Tensor]:
    """The images as the batcher takes them: model-sized [3, H, W] tensors."""
    return [encoder.preprocess(image) for image in images]


class GatedEncoder:
    """Wraps an encoder; its first call blocks until `release`, so work piles up behind it."""

    def __init__(self, encoder: Encoder) -> None:
        self.inner = encoder
        self.embed_dim = encoder.embed_dim
        self.started = threading.Event()
        self.release = threading.Event()

    def tokenize(self, texts):  # type: ignore[no-untyped-def]
        return self.inner.tokenize(texts)

    def encode_tokens(self, tokens):  # type: ignore[no-untyped-def]
        self.started.set()
        assert self.release.wait(WAIT_S)
        return self.inner.encode_tokens(tokens)

    def encode_pixels(self, pixels):  # type: ignore[no-untyped-def]
        self.started.set()
        assert self.release.wait(WAIT_S)
        return self.inner.encode_pixels(pixels)


async def _queued(batcher: EncodeBatcher, items: int) -> None:
    """Wait (bounded) until `items` are queued or being encoded: texts are tokenized on a
    threadpool thread before they are queued."""
    for _ in range(3000):
        if batcher.pending_items >= items:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{batcher.pending_items} items queued after 30 s, expected {items}")


async def _concurrently(batcher: EncodeBatcher, gate: GatedEncoder) -> list[np.ndarray]:
    """One text first (it occupies the worker), then the rest while it is stuck."""
    first = asyncio.ensure_future(batcher.encode_texts(TEXTS[:1]))
    assert await asyncio.to_thread(gate.started.wait, WAIT_S)
    rest = [asyncio.ensure_future(batcher.encode_texts([text])) for text in TEXTS[1:]]
    await _queued(batcher, len(TEXTS))
    gate.release.set()
    return await asyncio.gather(first, *rest)


def test_concurrent_texts_share_a_batch_and_get_their_own_rows(encoder: Encoder) -> None:
    gate, recorder = GatedEncoder(encoder), Recorder()
    batcher = EncodeBatcher(gate, max_batch_size=32, max_wait_ms=0, observer=recorder)  # type: ignore[arg-type]
    try:
        results = run_bounded(_concurrently(batcher, gate))
    finally:
        batcher.close()
    assert recorder.batches == [("text", 1, 1), ("text", len(TEXTS) - 1, len(TEXTS) - 1)]
    alone = encoder.encode_texts(TEXTS)
    for i, vector in enumerate(results):
        assert vector.shape == (1, encoder.embed_dim)
        torch.testing.assert_close(
            vector[0], encoder.encode_texts([TEXTS[i]])[0], atol=1e-5, rtol=0
        )
        torch.testing.assert_close(vector[0], alone[i], atol=1e-5, rtol=0)
    assert recorder.depths[-1] == 0


def test_batching_off_encodes_each_request_alone(encoder: Encoder) -> None:
    gate, recorder = GatedEncoder(encoder), Recorder()
    batcher = EncodeBatcher(gate, batching=False, observer=recorder)  # type: ignore[arg-type]
    try:
        results = run_bounded(_concurrently(batcher, gate))
    finally:
        batcher.close()
    assert [items for _, items, _ in recorder.batches] == [1] * len(TEXTS)
    torch.testing.assert_close(
        np.concatenate(results), encoder.encode_texts(TEXTS), atol=1e-5, rtol=0
    )


def test_images_batch_and_oversized_job_is_sliced(
    encoder: Encoder, images: list, pixels: list[torch.Tensor]
) -> None:
    recorder = Recorder()
    batcher = EncodeBatcher(encoder, max_batch_size=4, observer=recorder)
    try:
        vectors = run_bounded(batcher.encode_images(pixels))  # 6 images, batches of at most 4
    finally:
        batcher.close()
    assert vectors.shape == (len(images), encoder.embed_dim)
    ((kind, queue_s, inference_s),) = recorder.jobs  # one job, timed once over both slices
    assert kind == "image" and queue_s >= 0 and inference_s > 0
    torch.testing.assert_close(vectors, encoder.encode_images(images), atol=1e-5, rtol=0)
    for one, image in zip(vectors, images, strict=True):
        torch.testing.assert_close(one, encoder.encode_images([image])[0], atol=1e-5, rtol=0)


def test_full_queue_refuses_instead_of_waiting(encoder: Encoder) -> None:
    gate = GatedEncoder(encoder)
    batcher = EncodeBatcher(gate, max_queue_items=3)  # type: ignore[arg-type]

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.encode_texts(["a", "b"]))  # 2 pending
        assert await asyncio.to_thread(gate.started.wait, WAIT_S)
        second = asyncio.ensure_future(batcher.encode_texts(["c"]))  # 3 pending: at the limit
        await _queued(batcher, 3)
        with pytest.raises(Overloaded, match="limit 3"):
            await batcher.encode_texts(["d"])
        assert batcher.pending_items == 3
        gate.release.set()
        await asyncio.gather(first, second)
        assert batcher.pending_items == 0
        # an empty queue takes a job of any size
        assert (await batcher.encode_texts(["x"] * 5)).shape == (5, encoder.embed_dim)

    try:
        run_bounded(scenario())
    finally:
        batcher.close()


def test_a_failing_batch_fails_its_callers_and_the_worker_goes_on(encoder: Encoder) -> None:
    batcher = EncodeBatcher(encoder)

    async def scenario() -> None:
        failing = batcher.run(lambda: 1 / 0, cost_items=1)
        with pytest.raises(ZeroDivisionError):
            await failing
        assert (await batcher.encode_texts(["still works"])).shape == (1, encoder.embed_dim)

    try:
        run_bounded(scenario())
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="shut down"):
        run_bounded(batcher.encode_texts(["after close"]))


def test_then_runs_on_the_worker_per_job_and_fails_only_its_own_job(encoder: Encoder) -> None:
    gate, recorder = GatedEncoder(encoder), Recorder()
    batcher = EncodeBatcher(gate, max_batch_size=32, max_wait_ms=0, observer=recorder)  # type: ignore[arg-type]
    threads: list[str] = []

    def norm_and_thread(rows: np.ndarray) -> float:
        threads.append(threading.current_thread().name)
        return float(np.linalg.norm(rows))

    def failing(rows: np.ndarray) -> float:
        raise KeyError("no such row")

    async def scenario() -> list:
        first = asyncio.ensure_future(batcher.encode_texts(TEXTS[:1]))
        assert await asyncio.to_thread(gate.started.wait, WAIT_S)
        # queued behind the stuck first job: these three share the next forward pass
        jobs = [
            asyncio.ensure_future(batcher.encode_then("text", TEXTS[1:3], norm_and_thread)),
            asyncio.ensure_future(batcher.encode_then("text", TEXTS[3:4], failing)),
            asyncio.ensure_future(batcher.encode_texts(TEXTS[4:5])),
        ]
        await _queued(batcher, 5)
        gate.release.set()
        return await asyncio.gather(first, *jobs, return_exceptions=True)

    try:
        _, norm, error, rows = run_bounded(scenario())
        with pytest.raises(ValueError, match="at least one"):
            run_bounded(batcher.encode_then("text", [], norm_and_thread))
    finally:
        batcher.close()
    assert recorder.batches == [("text", 1, 1), ("text", 4, 3)]
    assert norm == pytest.approx(np.sqrt(2), abs=1e-5)  # two unit rows
    assert threads == ["duet-encoder"]
    assert isinstance(error, KeyError)
    torch.testing.assert_close(rows, encoder.encode_texts(TEXTS[4:5]), atol=1e-5, rtol=0)


def test_a_failing_item_fails_only_its_own_job_in_a_shared_batch(
    encoder: Encoder, pixels: list[torch.Tensor]
) -> None:
    """A wrong-sized image in a batch of five jobs: the batch is split and retried, so the four
    valid jobs get their own rows and only the guilty job fails."""
    gate, recorder = GatedEncoder(encoder), Recorder()
    batcher = EncodeBatcher(gate, max_batch_size=32, max_wait_ms=0, observer=recorder)  # type: ignore[arg-type]
    wrong = torch.zeros(3, 7, 7)  # not the model's input size: torch.stack of the batch fails

    async def scenario() -> list:
        first = asyncio.ensure_future(batcher.encode_images(pixels[:1]))
        assert await asyncio.to_thread(gate.started.wait, WAIT_S)
        jobs = [asyncio.ensure_future(batcher.encode_images([p])) for p in pixels[1:3]]
        jobs.append(asyncio.ensure_future(batcher.encode_images([wrong])))
        jobs += [asyncio.ensure_future(batcher.encode_images([p])) for p in pixels[3:5]]
        await asyncio.sleep(0.05)
        gate.release.set()
        return await asyncio.gather(first, *jobs, return_exceptions=True)

    try:
        results = run_bounded(scenario())
    finally:
        batcher.close()
    assert recorder.batches[1] == ("image", 5, 5)  # they did share one batch
    assert isinstance(results[3], RuntimeError)
    valid = [results[0], *results[1:3], *results[4:]]
    for rows, one in zip(valid, pixels[:5], strict=True):
        torch.testing.assert_close(rows, encoder.encode_pixels([one]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("max_wait_s", "bulk_first"), [(30.0, False), (0.0, True)])
def test_bulk_work_gives_way_to_interactive_jobs_queued_after_it(
    encoder: Encoder, monkeypatch: pytest.MonkeyPatch, max_wait_s: float, bulk_first: bool
) -> None:
    """A /classify's prompt chunk queued first is encoded after a search queued later, in a
    batch of its own — unless it has waited BULK_MAX_WAIT_S; both get their own rows."""
    monkeypatch.setattr(batching, "BULK_MAX_WAIT_S", max_wait_s)
    gate, recorder = GatedEncoder(encoder), Recorder()
    batcher = EncodeBatcher(gate, max_batch_size=32, max_wait_ms=0, observer=recorder)  # type: ignore[arg-type]

    async def scenario() -> list:
        first = asyncio.ensure_future(batcher.encode_texts(TEXTS[:1]))
        assert await asyncio.to_thread(gate.started.wait, WAIT_S)
        bulk = asyncio.ensure_future(batcher.encode_texts(TEXTS[1:4], bulk=True))
        await _queued(batcher, 4)
        search = asyncio.ensure_future(batcher.encode_texts(TEXTS[4:5]))
        await _queued(batcher, 5)
        gate.release.set()
        return await asyncio.gather(first, bulk, search)

    try:
        _, bulk_rows, search_rows = run_bounded(scenario())  # [3, D], [1, D]
    finally:
        batcher.close()
    # a bulk batch takes interactive jobs along; an interactive batch takes no bulk job
    order = [("text", 4, 2)] if bulk_first else [("text", 1, 1), ("text", 3, 1)]
    assert recorder.batches == [("text", 1, 1), *order]
    torch.testing.assert_close(bulk_rows, encoder.encode_texts(TEXTS[1:4]), atol=1e-5, rtol=0)
    torch.testing.assert_close(search_rows, encoder.encode_texts(TEXTS[4:5]), atol=1e-5, rtol=0)


class BrokenObserver(Recorder):
    def observe_job(self, kind: str, queue_s: float, inference_s: float) -> None:
        raise RuntimeError("metrics backend broke")


def test_a_fault_outside_the_jobs_fails_them_and_the_worker_lives_on(encoder: Encoder) -> None:
    """A bug around the forward pass (here: the metrics) answers the batch's callers with the
    error instead of killing the worker, which would leave every later request waiting."""
    batcher = EncodeBatcher(encoder, observer=BrokenObserver())
    try:
        with pytest.raises(RuntimeError, match="metrics backend broke"):
            run_bounded(batcher.encode_texts(TEXTS[:2]))
        with pytest.raises(RuntimeError, match="metrics backend broke"):  # answered again
            run_bounded(batcher.encode_texts(TEXTS[:1]))
    finally:
        batcher.close()


class TokenizeRecorder(GatedEncoder):
    """A gated encoder that notes the thread each tokenizing runs on."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__(encoder)
        self.tokenized_on: list[str] = []

    def tokenize(self, texts):  # type: ignore[no-untyped-def]
        self.tokenized_on.append(threading.current_thread().name)
        return self.inner.tokenize(texts)


def test_texts_are_tokenized_before_they_are_queued_not_on_the_encoder_thread(
    encoder: Encoder,
) -> None:
    """The encoder thread runs forward passes only: a request's texts are tokenized (on a
    threadpool thread) while the worker is busy with someone else's batch."""
    gate = TokenizeRecorder(encoder)
    batcher = EncodeBatcher(gate, max_batch_size=32, max_wait_ms=0)  # type: ignore[arg-type]

    async def scenario() -> list:
        first = asyncio.ensure_future(batcher.encode_texts(TEXTS[:1]))
        await asyncio.to_thread(gate.started.wait, 30)  # the worker is held in a forward pass
        search = asyncio.ensure_future(batcher.encode_then("text", TEXTS[1:2], lambda rows: rows))
        rest = asyncio.ensure_future(batcher.encode_texts(TEXTS[2:5]))
        await _queued(batcher, 5)  # queued as tokens while the worker is still held
        assert len(gate.tokenized_on) == 3
        gate.release.set()
        return await asyncio.gather(first, search, rest)

    try:
        first, search, rest = asyncio.run(scenario())
    finally:
        batcher.close()
    assert gate.tokenized_on and "duet-encoder" not in gate.tokenized_on
    torch.testing.assert_close(
        np.concatenate([first, search, rest]), encoder.encode_texts(TEXTS[:5]), atol=1e-5, rtol=0
    )
