"""Benchmark the text and image towers per runtime: torch eager, short-text torch, ONNX fp32, int8.

    python bench/encode.py [--models duet-tiny,ViT-B-32] [--batches 1,16] [--rounds 3]
                           [--seconds 2] [--runtimes eager,short,onnx,onnx-int8]

For each model (an open_clip name, built with random weights, which cost what trained ones do; or
an artifact directory), an artifact with ONNX towers is made in a temporary directory
(`common.onnx_towers`, fp32 and int8). Then, per tower and batch size, every runtime encodes the
same inputs for `--seconds`, runtimes interleaved round by round so that the machine's drift hits
all alike. Texts are search-like queries of 5-10 tokens ("a small red circle in the top left");
images are a 320x240 picture through the artifact's eval transform (the transform is not timed).

- eager: open_clip's own forward, texts padded to the full context (what serving did before);
- short: `DualEncoder` in eval mode, texts cut to the batch's real length (exact);
- onnx / onnx-int8: ONNX Runtime sessions of the exported towers (`OnnxTowers`), texts cut too.

Prints items/s (median over rounds), the speed-up over eager, and each runtime's largest
absolute embedding difference and smallest cosine to eager's.

    python bench/encode.py --quality runs/demo/artifact --data 'data/synth/val/shard-{...}.tar'

measures what the runtimes cost in retrieval quality instead: a trained artifact's held-out
text->image and image->text recall@1/5 with each runtime's embeddings (the int8 quality gate).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_load import queries  # noqa: E402  # the service benchmark's queries
from common.artifact import load_artifact, write_artifact  # noqa: E402
from common.export import probe_image  # noqa: E402
from common.model import build_model, normalize  # noqa: E402
from common.onnx_towers import OnnxTowers, export_onnx  # noqa: E402


def runtimes(artifact: Path, names: list[str]) -> dict[str, tuple[Callable, Callable]]:
    """name -> (encode tokens, encode pixels) for each runtime asked for."""
    model = load_artifact(artifact).model
    table: dict[str, tuple[Callable, Callable]] = {
        "eager": (
            lambda t: normalize(model.clip.encode_text(t)),
            lambda p: normalize(model.clip.encode_image(p)),
        ),
        "short": (model.encode_text, model.encode_image),
    }
    for variant in ("fp32", "int8"):
        name = "onnx" if variant == "fp32" else "onnx-int8"
        if name in names:
            towers = OnnxTowers.load(artifact, variant)
            table[name] = (towers.encode_text, towers.encode_image)
    return {name: table[name] for name in names}


def items_per_second(call: Callable, inputs: torch.Tensor, seconds: float) -> float:
    call(inputs)  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        call(inputs)
        count += len(inputs)
    return count / (time.perf_counter() - start)


def bench_model(model: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        if Path(model).is_dir():
            artifact = Path(tmp) / "artifact"
            write_artifact(load_artifact(model).model, artifact, provenance={})
        else:
            artifact = write_artifact(build_model(model), Path(tmp) / "artifact", provenance={})
        start = time.perf_counter()
        export_onnx(artifact, int8="onnx-int8" in args.runtimes)
        print(f"\n{model}: ONNX export {time.perf_counter() - start:.0f} s", flush=True)
        names = args.runtimes.split(",")
        table = runtimes(artifact, names)
        loaded = load_artifact(artifact)
        pixels_one = loaded.transform(probe_image())
        print(
            f"| tower | batch | {' | '.join(f'{n} items/s' for n in names)} "
            f"| {' | '.join(f'{n} vs eager' for n in names[1:])} | min cosine to eager |"
        )
        print(f"|---|---:|{'---:|' * (2 * len(names) - 1)}---|")
        for tower in ("text", "image"):
            for batch in args.batches:
                if tower == "text":
                    inputs = loaded.tokenize(queries(batch))
                else:
                    inputs = pixels_one.expand(batch, -1, -1, -1).contiguous()
                index = 0 if tower == "text" else 1
                rates: dict[str, list[float]] = {n: [] for n in names}
                with torch.inference_mode():
                    for _ in range(args.rounds):
                        for name in names:
                            rate = items_per_second(table[name][index], inputs, args.seconds)
                            rates[name].append(rate)
                    reference = table["eager"][index](inputs) if "eager" in table else None
                    cosines = []
                    for name in names:
                        out = table[name][index](inputs)
                        if reference is not None:
                            cosines.append(f"{name} {float((out * reference).sum(-1).min()):.5f}")
                median = {n: statistics.median(r) for n, r in rates.items()}
                ratios = [f"{median[n] / median[names[0]]:.2f}x" for n in names[1:]]
                print(
                    f"| {tower} | {batch} | {' | '.join(f'{median[n]:.1f}' for n in names)} "
                    f"| {' | '.join(ratios)} | {', '.join(cosines[1:])} |",
                    flush=True,
                )


def quality(artifact: Path, data: str, names: list[str]) -> None:
    """Held-out recall@1/5 of a trained artifact with each runtime's embeddings."""
    from collections import Counter

    from common.preprocess import ResizeLimit, decode_or_skip, preprocess_config
    from common.shards import iter_shards
    from train.evaluate import retrieval_metrics

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        copy = Path(tmp) / "artifact"
        write_artifact(load_artifact(artifact).model, copy, provenance={})
        export_onnx(copy, int8=True)
        loaded, table = load_artifact(copy), runtimes(copy, names)
        pixels, captions = [], []
        resize = ResizeLimit(preprocess_config(loaded.model.clip))
        for sample in iter_shards(data, Counter()):
            image = decode_or_skip(sample.image, Counter(), key=sample.key, resize=resize)
            if image is not None:
                pixels.append(loaded.transform(image))
                captions.append(sample.caption)
        images, tokens = torch.stack(pixels), loaded.tokenize(captions)
        print(f"\n{artifact}: {len(captions)} held-out pairs from {data}")
        print("| runtime | t->i R@1 | t->i R@5 | i->t R@1 | i->t R@5 |")
        print("|---|---:|---:|---:|---:|")
        with torch.inference_mode():
            for name in names:
                encode_text, encode_image = table[name]
                text = torch.cat([encode_text(t) for t in tokens.split(256)])
                image = torch.cat([encode_image(p) for p in images.split(256)])
                m = retrieval_metrics(image, text, (1, 5))
                print(
                    f"| {name} | {m['text_to_image_recall@1']:.4f} "
                    f"| {m['text_to_image_recall@5']:.4f} | {m['image_to_text_recall@1']:.4f} "
                    f"| {m['image_to_text_recall@5']:.4f} |",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="duet-tiny,ViT-B-32")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="per runtime, round and row")
    parser.add_argument("--runtimes", default="eager,short,onnx,onnx-int8")
    parser.add_argument("--quality", help="a trained artifact: recall per runtime instead")
    parser.add_argument("--data", help="with --quality: held-out shards (brace patterns)")
    args = parser.parse_args()
    if args.quality:
        warnings.filterwarnings("ignore")
        quality(Path(args.quality), args.data, args.runtimes.split(","))
        return 0
    args.batches = [int(b) for b in args.batches.split(",")]
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for model in args.models.split(","):
        bench_model(model, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
