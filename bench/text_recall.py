"""Benchmark text-query against image-query recall@10 of a real model's index, per index type.

    nice -n 19 python bench/text_recall.py --model runs/demo/artifact \
        --shards 'data/synth/train/shard-{000000..000099}.tar' \
        --queries data/synth/val/shard-000000.tar --zeroshot data/synth/zeroshot.json \
        [--out /tmp/duet-text-recall] [--runtime onnx] [--parts DIR] [--also-rerank 100]
        [--types auto,ivfpq,ondisk] [--keep]

The index is built three times with `python -m serve.build_index` (no thumbnails): at the index
type `auto` chooses for the count, as in-memory `ivfpq` (4-bit fast-scan codes), and `--on-disk`
(bench/ondisk.py's tier: 8-bit PQ, float16 re-rank). The `--queries` shards (held out: not in
the index) are embedded the same way, and their captions and every class prompt (zero-shot
class x template) through the text tower.
Each index is then loaded as the service loads it and its recall@10 against exact search over
its own stored vectors measured for each kind of query:

    stored images      the manifest's `recall_at_10`: stored vectors as queries, self left out
    held-out images    images of the --queries shards
    index captions     the manifest's `text_recall_at_10`: sampled captions of indexed rows
    held-out captions  the captions of the --queries shards
    class prompts      "a photo of a red circle." ...: what /classify-style queries send

With `--parts`, "build s" is the merge and the index alone (the embedding was done once).

A text query sits across the modality gap from every image, between cells rather than inside
one, so its recall is the figure a user's search gets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve.encoder import Encoder  # noqa: E402
from serve.indexing.build import load_encoder  # noqa: E402
from serve.indexing.index import SearchIndex  # noqa: E402
from serve.indexing.vector_search import measure_query_recall  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TEXT_BATCH = 256
TYPES = {"auto": [], "ivfpq": ["--index-type", "ivfpq"], "ondisk": ["--on-disk"]}
"""The index types built: their build_index options."""


def build(
    model: Path, data: str, out: Path, runtime: str, *extra: str, parts: Path | None = None
) -> float:
    """`python -m serve.build_index` into `out`; its wall-clock seconds. `parts`: a finished
    parts folder of the same build, resumed from a copy (nothing is embedded again)."""
    command = [sys.executable, "-m", "serve.build_index", "--model", str(model), "--data", data]
    command += ["--out", str(out), "--thumbnails", "none", "--runtime", runtime, *extra]
    if parts is not None:
        shutil.copytree(parts, f"{out}.parts")
        command += ["--parts-dir", f"{out}.parts", "--resume"]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def texts(encoder: Encoder, items: list[str]) -> np.ndarray:
    """Texts through the text tower [N, D], in batches."""
    return np.concatenate(
        [encoder.encode_texts(items[i : i + TEXT_BATCH]) for i in range(0, len(items), TEXT_BATCH)]
    )


def query_sets(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The held-out images, their captions and the class prompts, embedded [Q, D] each."""
    held_out = args.out / "queries"
    build(args.model, args.queries, held_out, args.runtime, "--index-type", "flat")
    index = SearchIndex.load(held_out, writable=False)
    try:
        images = np.array(index._searcher.vectors, dtype=np.float32)
        captions = [row.caption for row in index.rows(list(range(index.count))).values()]
    finally:
        index.close()
    zeroshot = json.loads(args.zeroshot.read_text())
    prompts = [t.format(c) for c in zeroshot["classnames"] for t in zeroshot["templates"]]
    encoder = load_encoder(args.model.resolve(), args.runtime, "cpu")
    return {
        "held-out images": images,
        "held-out captions": texts(encoder, captions),
        "class prompts": texts(encoder, prompts),
    }


def measure(
    index_dir: Path, queries: dict[str, np.ndarray], rerank: int | None = None
) -> dict[str, Any]:
    """The index's manifest figures and its recall@10 for each query set; `rerank`: searched
    with this rerank factor instead of the manifest's (the manifest's figures are left out)."""
    manifest = json.loads((index_dir / "index.json").read_text())
    index = SearchIndex.load(index_dir, writable=False)
    try:
        if rerank is not None:
            index._searcher.rerank_factor = rerank
        figures = {name: measure_query_recall(index._searcher, q) for name, q in queries.items()}
    finally:
        index.close()
    return {
        "type": f"{manifest['factory'] or 'flat'} {manifest['search_params'] or ''}"
        + (" on disk" if manifest["on_disk"] else ""),
        "rerank": rerank or manifest["rerank_factor"],
        "stored images": "" if rerank else manifest["recall_at_10"],
        "index captions": "" if rerank else manifest["text_recall_at_10"],
        **figures,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model artifact")
    parser.add_argument("--shards", required=True, help="what is indexed (--data of the build)")
    parser.add_argument("--queries", required=True, help="held-out shards: the image queries")
    parser.add_argument("--zeroshot", type=Path, required=True, help="classnames + templates")
    parser.add_argument("--out", type=Path, default=Path("/tmp/duet-text-recall"))
    parser.add_argument("--runtime", default="onnx", help="build_index --runtime")
    parser.add_argument(
        "--parts",
        type=Path,
        help="a finished parts folder of these --model, --shards and --runtime (build.json and "
        "every chunk, e.g. kept from a build killed after embedding): each build resumes a copy "
        "of it, so the shards are embedded once, not per index type",
    )
    parser.add_argument(
        "--also-rerank",
        type=int,
        help="measure the ivfpq indices again with this rerank factor (set at search time)",
    )
    parser.add_argument(
        "--types",
        default=",".join(TYPES),
        help=f"the index types built, comma-separated, of {', '.join(TYPES)}",
    )
    parser.add_argument("--keep", action="store_true", help="keep the indices afterwards")
    args = parser.parse_args(argv)
    types = args.types.split(",")
    if unknown := set(types) - set(TYPES):
        parser.error(f"unknown --types {sorted(unknown)}; choose from {', '.join(TYPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    queries = query_sets(args)
    rows = []
    for name in types:
        extra = TYPES[name]
        seconds = build(
            args.model, args.shards, args.out / name, args.runtime, *extra, parts=args.parts
        )
        rows.append({**measure(args.out / name, queries), "build s": round(seconds)})
        print(json.dumps(rows[-1]), flush=True)
        if args.also_rerank and name != "auto":
            rows.append({**measure(args.out / name, queries, args.also_rerank), "build s": ""})
            print(json.dumps(rows[-1]), flush=True)
    count = json.loads((args.out / types[0] / "index.json").read_text())["count"]
    sizes = ", ".join(f"{k} {len(v)}" for k, v in queries.items())
    print(f"\n{count} indexed; queries: {sizes}, stored and index captions 1000 each\n")
    columns = ["type", "rerank", "stored images", "held-out images", "index captions"]
    columns += ["held-out captions", "class prompts", "build s"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
