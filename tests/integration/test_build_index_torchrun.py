"""`torchrun -m serve.build_index` with two gloo processes equals the one-process build, over
shards, a folder of pictures and an img2dataset parquet file together; and for the on-disk tier,
whose lists every rank adds to."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.artifact import write_artifact
from common.model import build_model
from serve.indexing.build import build_index
from serve.indexing.index import SearchIndex
from serve.indexing.thumbnails import ThumbnailSpec
from serve.indexing.vector_search import IndexSpec
from tests.conftest import REPO_ROOT, subprocess_env
from tests.serve_support import assert_same_hits
from tests.unit.test_sources import img2dataset_parquet, photo_folder

pytestmark = pytest.mark.slow


def _bad_shard(path: Path, name: str) -> Path:
    """A shard with one undecodable image and one good one."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 90)).save(png, format="PNG")
    members = {
        f"{name}-0.jpg": b"not a jpeg",
        f"{name}-0.txt": b"broken",
        f"{name}-1.png": png.getvalue(),
        f"{name}-1.txt": f"good image of {name}".encode(),
    }
    with tarfile.open(path, "w") as tar:
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_two_process_build_equals_one_process_build(tmp_path: Path, synth_dir: Path) -> None:
    artifact = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    val = sorted((synth_dir / "val").glob("shard-*.tar"))
    # Ranks take shards 0, 2 and 1, 3: each gets one bad sample, and rows interleave by shard.
    bad_a, bad_b = _bad_shard(tmp_path / "a.tar", "a"), _bad_shard(tmp_path / "b.tar", "b")
    shards = [val[0], bad_a, bad_b, *val[1:]]
    # then a folder (one part: 5 good pictures, 1 broken, 1 TIFF) and a parquet file (3 good rows)
    folder = photo_folder(tmp_path / "photos")
    parquet = img2dataset_parquet(tmp_path / "00000.parquet")
    data = "::".join(str(s) for s in [*shards, folder, parquet])

    one = build_index(artifact, data, tmp_path / "one", batch_size=64)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    build = ["--model", str(artifact), "--data", data, "--out", str(tmp_path / "two")]
    command = [*torchrun, "-m", "serve.build_index", *build, "--batch-size", "64", "--workers", "0"]
    result = subprocess.run(
        command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"indexed {one['count']} images" in result.stdout
    assert not (tmp_path / "two.parts").exists()  # rank 0 removed the parts after merging

    a, b = SearchIndex.load(tmp_path / "one"), SearchIndex.load(tmp_path / "two")
    assert a.count == b.count == one["count"] == 500 + 2 + 5 + 3
    skipped = {"corrupt_image": 2 + 1 + 1, "missing_image": 1, "unsupported_format": 1}
    assert a.manifest["skipped"] == b.manifest["skipped"] == skipped
    assert b.manifest["build_processes"] == 2
    ids = list(range(a.count))
    rows_a, rows_b = a.rows(ids), b.rows(ids)
    assert [rows_a[i].key for i in ids] == [rows_b[i].key for i in ids]  # same ids, shard order
    assert rows_a[250].key == "a-1" and rows_a[251].key == "b-1"
    assert rows_b[502].meta["source"] == "2024/summer/photo1.png"
    assert rows_b[509].meta["url"] == "https://example.com/4.jpg"
    np.testing.assert_allclose(b.vectors(ids), a.vectors(ids), rtol=0, atol=1e-5)
    # thumbnails follow the rows through the merge: byte-identical, id for id
    assert a.thumbnails is not None and b.thumbnails is not None
    assert [a.thumbnails.get(i) for i in ids] == [b.thumbnails.get(i) for i in ids]
    assert rows_b[251].meta["member"] == "b-1.png" and rows_b[509].meta["row"] == 4
    a.close()
    b.close()


def test_two_process_on_disk_build_adds_on_every_rank_and_equals_one_process(
    tmp_path: Path, synth_dir: Path
) -> None:
    """`--on-disk` under torchrun: each rank adds its own parts' vectors to lists of its own and
    rank 0 merges them; the index is the one-process build's, byte for byte."""
    artifact = write_artifact(build_model("duet-micro"), tmp_path / "artifact", provenance={})
    data = str(synth_dir / "train" / "shard-{000000..000007}.tar")  # 8 parts, 4 per rank
    spec = IndexSpec(index_type="ivfpq", on_disk=True, recall_queries=200)
    none = ThumbnailSpec(format="none")
    one = build_index(artifact, data, tmp_path / "one", batch_size=125, spec=spec, thumbnails=none)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    build = ["--model", str(artifact), "--data", data, "--out", str(tmp_path / "two")]
    knobs = [
        "--index-type",
        "ivfpq",
        "--on-disk",
        "--recall-queries",
        "200",
        "--thumbnails",
        "none",
    ]
    command = [*torchrun, "-m", "serve.build_index", *build, *knobs, "--batch-size", "125"]
    result = subprocess.run(
        [*command, "--workers", "0"],
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: added 1000 vectors of its 4 parts to its lists" in result.stderr
    assert not (tmp_path / "two.parts").exists()
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    for name in ("index.ivfdata", "vectors.npy", "attributes.npz"):
        assert (one_dir / name).read_bytes() == (two_dir / name).read_bytes(), name
    a, b = SearchIndex.load(one_dir), SearchIndex.load(two_dir)
    try:
        assert a.count == b.count == one["count"] == 2000
        assert b.manifest["on_disk"] and b.manifest["build_processes"] == 2
        assert a.manifest["recall_at_10"] == b.manifest["recall_at_10"]
        assert a.manifest["text_recall_at_10"] == b.manifest["text_recall_at_10"]
        queries = a.vectors(list(range(0, 2000, 40)))
        assert_same_hits(a, b, queries)
    finally:
        a.close()
        b.close()
