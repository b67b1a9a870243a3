"""What runs the towers: ONNX Runtime where the artifact's ONNX towers verify, else torch.

`DUET_RUNTIME=auto` (the default) serves with ONNX Runtime fp32: faster than torch idle, and on
a CPU shared with other work it served 2-24x torch's req/s beside the same busy processes, where
torch's OpenMP threads collapse (docs/benchmarks.md, "Beside other work"); for torch's
embeddings within 1e-4. The towers are exported into the
artifact at the first start (`common.onnx_towers.export_once`: one worker exports, the others
wait for it) and reused after; at every start they are compared with the torch model on probe
inputs (its embeddings are taken and its weights freed before the towers load). Where that
cannot be done — a read-only artifact without towers, a model the exporter cannot handle,
towers that differ from the weights, a GPU device — the service runs torch, logs one line
saying why, and /ready shows the reason.
`torch`, `onnx` and `onnx-int8` ask for one runtime: no export, no fallback, an error instead.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from common.artifact import LoadedModel, load_artifact
from common.cpus import available_cpus
from common.onnx_towers import OnnxTowers, export_once, load_checked
from serve.encoder import Encoder
from serve.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The runtime chosen: its name, its towers (None: the torch model) and, when `auto`
    settled for torch, why."""

    name: str  # torch | onnx | onnx-int8
    towers: OnnxTowers | None
    fallback_reason: str | None = None


def load_encoder(settings: Settings) -> tuple[Encoder, Runtime]:
    """The artifact's encoder on the runtime `settings` asks for.

    With ONNX Runtime the torch towers' weights are freed before the ONNX ones load
    (`common.onnx_towers.load_checked`), and only tokenizer and transform stay. Where `auto`
    settles for torch after that, the artifact is read again.
    """
    fit_threads_to_cpus(settings.encode_threads)
    loaded = load_artifact(settings.artifact_dir, device=settings.device)
    runtime = load_runtime(settings, loaded)
    if runtime.towers is None and loaded.model.weights_dropped:
        loaded = load_artifact(settings.artifact_dir, device=settings.device)
    return Encoder(loaded, settings.device, runtime.towers), runtime


def load_runtime(settings: Settings, loaded: LoadedModel) -> Runtime:
    """The runtime `settings.runtime` asks for, checked against `loaded`'s torch model."""
    if settings.runtime == "torch":
        return Runtime("torch", None)
    if settings.runtime != "auto":
        variant = "int8" if settings.runtime == "onnx-int8" else "fp32"
        towers = _load_towers(settings, loaded, variant)
        log.info("runtime: ONNX Runtime (%s towers)", variant)
        return Runtime(settings.runtime, towers)
    if settings.device != "cpu":
        return _torch_because(f"device {settings.device}: the ONNX towers run on the CPU")
    try:
        started = time.perf_counter()
        if export_once(settings.artifact_dir):
            log.info(
                "exported the ONNX towers into %s/onnx in %.1f s (once: later starts reuse them)",
                settings.artifact_dir,
                time.perf_counter() - started,
            )
        towers = _load_towers(settings, loaded, "fp32")
    except Exception as exc:  # any failure to export, load or verify: torch serves instead
        reason = f"ONNX towers unusable: {type(exc).__name__}: {exc}"
        if isinstance(exc, OSError):  # e.g. an artifact mounted read-only before an export
            command = f"python -m common.onnx_towers {settings.artifact_dir}"
            reason += f" (export them beforehand: `{command}`)"
        return _torch_because(reason)
    log.info("runtime: ONNX Runtime (fp32 towers)")
    return Runtime("onnx", towers)


def _load_towers(settings: Settings, loaded: LoadedModel, variant: str) -> OnnxTowers:
    """The artifact's ONNX towers, checked against `loaded` (whose weights go), with the thread
    settings (torch's thread count, set by `fit_threads_to_cpus`, is ONNX Runtime's too)."""
    return load_checked(
        loaded, settings.artifact_dir, variant, threads=None, spinning=settings.onnx_spinning
    )


def fit_threads_to_cpus(encode_threads: int = 0) -> None:
    """torch's threads (and so ONNX Runtime's, `OnnxTowers`): `encode_threads` if set, else no
    more than the CPUs this process may use (`common.cpus`): torch counts the host's cores, not
    a container's limit."""
    if encode_threads > 0:
        log.info("threads per forward pass: %d (encode_threads)", encode_threads)
        torch.set_num_threads(encode_threads)
        return
    cpus, threads = available_cpus(), torch.get_num_threads()
    if threads > cpus:
        log.info(
            "threads per forward pass: %d (the CPUs this process may use), not %d", cpus, threads
        )
        torch.set_num_threads(cpus)


def _torch_because(reason: str) -> Runtime:
    log.warning("runtime: torch, not ONNX Runtime: %s", reason)
    return Runtime("torch", None, reason)
