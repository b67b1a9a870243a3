r"""The artifact's two towers as ONNX models, and ONNX Runtime sessions that run them.

    python -m common.onnx_towers ARTIFACT_DIR [--int8]

adds `onnx/text.onnx` and `onnx/image.onnx` (and with `--int8`, `text.int8.onnx` and
`image.int8.onnx`) plus `onnx/manifest.json` to an artifact. Each tower is exported with
torch's dynamo ONNX exporter from the same forward our torch path runs (`DualEncoder`), L2
normalisation included, with a dynamic batch axis and, for a text tower whose padding can be cut
(`common.model.text_pooling`), a dynamic length axis: batches run at their real length, as in
torch. Before the files are put in place, ONNX Runtime's embeddings of probe inputs are compared
with torch's: fp32 must agree within 1e-4 (absolute, on unit vectors), and the int8 models
(dynamic quantisation of the matrix multiplies only: convolutions got slower and less accurate)
must keep a cosine of at least 0.99 to torch's; the figures go into the manifest.

The service runs these files (`OnnxTowers`): fp32 by default (`DUET_RUNTIME=auto`, which exports
them at its first start through `export_once` and checks them with `verify_towers` at every
start, through `load_checked`), or as `DUET_RUNTIME=onnx` / `onnx-int8` asks.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.artifact import LoadedModel, load_artifact
from common.atomic_dir import replace_dir, staging_dir
from common.model import (
    DualEncoder,
    encode_text_prefix,
    normalize,
    pooled_length,
    text_pooling,
)

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
MANIFEST = "manifest.json"
VARIANTS = {"fp32": ("text.onnx", "image.onnx"), "int8": ("text.int8.onnx", "image.int8.onnx")}
FP32_TOLERANCE = 1e-4
INT8_MIN_COSINE = 0.99
OPSET = 18
PROBE_TEXTS = ("a red circle", "a photo of a dog on a beach at sunset", "x")
# The most rows one session run takes; a bigger batch runs in slices of this many. ONNX Runtime's
# CPU arena keeps what a run's activations needed and grew again at the second run of a batch of
# 256 (ViT-B-32 image tower: +1.3 GB, then +2.6 GB over the session); slices of 32 hold +0.3 GB
# and are no slower (docs/benchmarks.md, "Building an index of a folder of photos").
ROWS_PER_RUN = 32


class OnnxExportError(RuntimeError):
    """An export whose ONNX embeddings do not match torch's, or a missing ONNX file."""


class _TextTower(nn.Module):
    """[B, L] token ids -> [B, D] unit vectors, at the length given (cut or full context)."""

    def __init__(self, model: DualEncoder, cut: bool) -> None:
        super().__init__()
        self.clip, self.cut = model.clip, cut

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cut:
            return normalize(encode_text_prefix(self.clip, tokens))
        return normalize(self.clip.encode_text(tokens))


class _ImageTower(nn.Module):
    """[B, 3, H, W] preprocessed images -> [B, D] unit vectors."""

    def __init__(self, model: DualEncoder) -> None:
        super().__init__()
        self.clip = model.clip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return normalize(self.clip.encode_image(pixels))


def export_onnx(artifact_dir: str | Path, *, int8: bool = False) -> dict[str, Any]:
    """Write ARTIFACT/onnx (replaced) after checking its embeddings; returns its manifest."""
    artifact_dir = Path(artifact_dir)
    loaded = load_artifact(artifact_dir)
    model = loaded.model
    pooling = text_pooling(model.clip)
    reference = TorchReference.of(loaded)
    tokens, pixels = reference.tokens, reference.pixels
    target = artifact_dir / ONNX_DIR
    staging = staging_dir(target)
    try:
        _export(_TextTower(model, pooling is not None), tokens, staging / "text.onnx", pooling)
        _export(_ImageTower(model), pixels, staging / "image.onnx", None)
        manifest: dict[str, Any] = {
            "text_pooling": list(pooling) if pooling else None,
            "context_length": int(tokens.shape[1]),
            "opset": OPSET,
            "checks": {},
        }
        variants = ["fp32", "int8"] if int8 else ["fp32"]
        if int8:
            for name in ("text", "image"):
                _quantize(staging / f"{name}.onnx", staging / f"{name}.int8.onnx")
        for variant in variants:
            towers = OnnxTowers(staging, variant, pooling, threads=None)
            manifest["checks"][variant] = verify_towers(reference, towers, variant)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def has_towers(artifact_dir: str | Path, variant: str = "fp32") -> bool:
    """Whether ARTIFACT/onnx holds the `variant` towers (its manifest and both files)."""
    folder = Path(artifact_dir) / ONNX_DIR
    return (folder / MANIFEST).is_file() and all((folder / f).is_file() for f in VARIANTS[variant])


def export_once(artifact_dir: str | Path) -> bool:
    """`export_onnx` (fp32) unless the fp32 towers are there; True if this call exported them.

    Several workers starting at once on one artifact take turns through an exclusive lock on
    the artifact directory: the first exports, the others wait and find the towers. The export
    itself is put in place in one step (`common.atomic_dir`), so a worker killed mid-export
    leaves the cache as it was.
    """
    artifact_dir = Path(artifact_dir)
    if has_towers(artifact_dir):
        return False
    if not os.access(artifact_dir, os.W_OK):  # e.g. mounted read-only: say so before any work
        raise PermissionError(f"{artifact_dir} is not writable: its ONNX towers cannot be added")
    fd = os.open(artifact_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also when this process dies
        if has_towers(artifact_dir):  # another worker exported them while this one waited
            return False
        export_onnx(artifact_dir)
        return True
    finally:
        os.close(fd)


def _export(
    module: nn.Module, example: torch.Tensor, path: Path, pooling: tuple[str, int | None] | None
) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    axes: dict[int, Any] = {0: batch}
    if pooling is not None:  # the text tower runs at each batch's real length
        axes[1] = torch.export.Dim("length", min=2, max=int(example.shape[1]))
    name = "tokens" if example.dtype == torch.long else "pixels"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            (example,),
            dynamo=True,
            dynamic_shapes={name: axes},
            input_names=[name],
            output_names=["embeddings"],
            opset_version=OPSET,
            verbose=False,
        )
    assert program is not None
    program.save(str(path))


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation of the MatMul weights (activations quantised at run time)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = source.with_suffix(".prep.onnx")
    # symbolic shape inference fails on the exporter's dynamic length axis; ONNX's own suffices
    quant_pre_process(source, prepared, skip_symbolic_shape=True)
    quantize_dynamic(prepared, target, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8)
    prepared.unlink()


def probe_inputs(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs both runtimes are compared on: 3 texts' [3, C] tokens, 2 images [2, 3, H, W]."""
    size = loaded.model.clip.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    return loaded.tokenize(list(PROBE_TEXTS)), pixels


@dataclass(frozen=True, slots=True)
class TorchReference:
    """The torch model's embeddings of `probe_inputs`: what ONNX towers are checked against.
    A few KB, so the torch weights need not stay resident while the towers load."""

    tokens: torch.Tensor
    pixels: torch.Tensor
    text: torch.Tensor
    image: torch.Tensor

    @classmethod
    def of(cls, loaded: LoadedModel) -> TorchReference:
        tokens, pixels = probe_inputs(loaded)
        with torch.no_grad():
            text, image = loaded.model.encode_text(tokens), loaded.model.encode_image(pixels)
        return cls(tokens, pixels, text, image)


def load_checked(
    loaded: LoadedModel,
    artifact_dir: str | Path,
    variant: str,
    *,
    threads: int | None = None,
    spinning: bool = False,
) -> OnnxTowers:
    """The artifact's `variant` towers (`OnnxTowers.load`), checked against `loaded`'s torch
    model (`verify_towers`). The torch towers' weights are freed first
    (`DualEncoder.drop_tower_weights`): both resident at once were the memory peak of every
    ONNX start and build (docs/benchmarks.md, "Resident memory per runtime"). `loaded.model`
    cannot run afterwards, whether or not the towers pass."""
    reference = TorchReference.of(loaded)
    loaded.model.drop_tower_weights()
    towers = OnnxTowers.load(artifact_dir, variant, threads=threads, spinning=spinning)
    verify_towers(reference, towers, variant)
    return towers


def verify_towers(reference: TorchReference, towers: OnnxTowers, variant: str) -> dict[str, float]:
    """Compare the towers' embeddings of `probe_inputs` with the torch model's; raise
    `OnnxExportError` if they are too far apart (fp32: 1e-4, int8: cosine 0.99)."""
    ours = (reference.text, reference.image)
    theirs = (towers.encode_text(reference.tokens), towers.encode_image(reference.pixels))
    diff = max(float((a - b).abs().max()) for a, b in zip(ours, theirs, strict=True))
    cosine = min(float((a * b).sum(-1).min()) for a, b in zip(ours, theirs, strict=True))
    if variant == "fp32" and diff > FP32_TOLERANCE:
        raise OnnxExportError(f"ONNX fp32 embeddings differ from torch's by {diff:.3g}")
    if variant == "int8" and cosine < INT8_MIN_COSINE:
        raise OnnxExportError(f"int8 embeddings have cosine {cosine:.4f} to torch's (< 0.99)")
    log.info("onnx %s: max |difference| %.2g, min cosine %.6f", variant, diff, cosine)
    return {"max_abs_difference": diff, "min_cosine": cosine}


class OnnxTowers:
    """ONNX Runtime sessions of both towers, with `DualEncoder`'s encode_text/encode_image."""

    def __init__(
        self,
        folder: Path,
        variant: str,
        pooling: tuple[str, int | None] | None,
        *,
        threads: int | None,
        spinning: bool = False,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Off by default: a thread waiting for work sleeps instead of spinning, so its core goes
        # to FAISS, the HTTP threads and the host's other processes (docs/benchmarks.md,
        # "Beside other work"). ONNX Runtime's own default is to spin.
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(spinning)))
        text_file, image_file = VARIANTS[variant]
        providers = ["CPUExecutionProvider"]
        self.text = ort.InferenceSession(str(folder / text_file), options, providers=providers)
        self.image = ort.InferenceSession(str(folder / image_file), options, providers=providers)
        self.pooling = pooling

    @classmethod
    def load(
        cls,
        artifact_dir: str | Path,
        variant: str = "fp32",
        *,
        threads: int | None = None,
        spinning: bool = False,
    ) -> OnnxTowers:
        """The towers of ARTIFACT/onnx; a clear error naming the command when they are absent."""
        folder = Path(artifact_dir) / ONNX_DIR
        manifest_path = folder / MANIFEST
        if variant not in VARIANTS:
            raise ValueError(f"ONNX variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not has_towers(artifact_dir, variant):
            flag = " --int8" if variant == "int8" else ""
            raise OnnxExportError(
                f"{artifact_dir} has no ONNX {variant} towers: run "
                f"`python -m common.onnx_towers {artifact_dir}{flag}` first"
            )
        manifest = json.loads(manifest_path.read_text())
        pooling = manifest["text_pooling"]
        pooling = tuple(pooling) if pooling else None
        return cls(folder, variant, pooling, threads=threads, spinning=spinning)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, C] token ids -> [B, D] unit vectors (cut to the batch's real length if exact)."""
        if self.pooling is not None:
            length = pooled_length(tokens, *self.pooling)
            tokens = tokens[:, :length] if length is not None else tokens
        return _run_in_slices(self.text, "tokens", tokens.cpu().numpy().astype(np.int64))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed images -> [B, D] unit vectors."""
        # no copy of a float32 batch (a batch of 256 is 154 MB)
        inputs = pixels.cpu().numpy().astype(np.float32, copy=False)
        return _run_in_slices(self.image, "pixels", inputs)


def _run_in_slices(session: Any, name: str, inputs: np.ndarray) -> torch.Tensor:
    """`session`'s output for `inputs` [B, ...], run `ROWS_PER_RUN` rows at a time -> [B, D]."""
    if len(inputs) <= ROWS_PER_RUN:
        return torch.from_numpy(session.run(None, {name: inputs})[0])
    slices = range(0, len(inputs), ROWS_PER_RUN)
    outs = [session.run(None, {name: inputs[i : i + ROWS_PER_RUN]})[0] for i in slices]
    return torch.from_numpy(np.concatenate(outs))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.onnx_towers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("artifact", help="model artifact directory")
    parser.add_argument("--int8", action="store_true", help="also int8-quantised towers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("common").setLevel(logging.INFO)
    try:
        manifest = export_onnx(args.artifact, int8=args.int8)
    except (FileNotFoundError, ValueError, OnnxExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    checks = ", ".join(
        f"{variant}: max difference {c['max_abs_difference']:.2g}, min cosine {c['min_cosine']:.5f}"
        for variant, c in manifest["checks"].items()
    )
    print(f"wrote {Path(args.artifact) / ONNX_DIR} ({checks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
