"""Benchmark one training step's forward + backward: precision, GradCache, checkpointing, compile.

    python bench/train_step.py [--model ViT-B-32] [--batch 512] [--chunk 128] [--steps 5]
                               [--precisions fp32,bf16,fp16] [--device cuda] [--compile]

One process, random images and tokens, the CLIP loss; weights are random (nothing is
downloaded). Each row is one configuration: step time (median of --steps after two warm-ups),
samples/s, and on GPU the peak memory allocated during the step. GradCache rows must show the
same loss as the one-pass row of the same precision (printed, to 4 decimals). fp16 rows need a
GPU. The optimizer step is not included: it is the same for every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Run as a script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.model import build_model, model_config  # noqa: E402
from train.compute import Precision, prepare_model, uses_channels_last  # noqa: E402
from train.config import ComputeConfig, LossConfig  # noqa: E402
from train.distributed import DistInfo  # noqa: E402
from train.objective import Inputs, StepLoss  # noqa: E402
from train.step import forward_backward  # noqa: E402


def run(args: argparse.Namespace, precision: str, chunk: int, checkpointing: bool) -> str:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model, device=device)
    compute = ComputeConfig(grad_checkpointing=checkpointing, compile=args.compile)
    prepare_model(model, compute, device)
    cfg = model_config(args.model)
    size, context = cfg["vision_cfg"]["image_size"], cfg["text_cfg"].get("context_length", 77)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    if uses_channels_last(model, compute, device):
        images = images.contiguous(memory_format=torch.channels_last)
    tokens = torch.randint(1, 1000, (args.batch, context), generator=g).to(device)
    info, loss_cfg = DistInfo(0, 1, 0, device), LossConfig()
    amp = Precision(precision, device)
    times, loss = [], torch.zeros(())
    for i in range(args.steps + 2):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        inputs, step_loss = Inputs(images, tokens), StepLoss(loss_cfg, info)
        loss = forward_backward(model, inputs, step_loss, amp, grad_cache_chunk=chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    memory = (
        f"{torch.cuda.max_memory_allocated() / 2**30:8.2f}" if device.type == "cuda" else "     n/a"
    )
    how = f"GradCache {chunk}" if chunk else "one pass"
    return (
        f"| {precision:5} | {how:15} | {'yes' if checkpointing else 'no':3} | {step_s * 1000:9.1f} "
        f"| {args.batch / step_s:9.0f} | {memory} | {loss.item():.4f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    print(f"{args.model}, batch {args.batch}, device {args.device}, compile {args.compile}")
    print("| precision | strategy | ckpt | step ms | samples/s | peak GiB | loss |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for precision in args.precisions.split(","):
        for chunk, checkpointing in ((0, False), (0, True), (args.chunk, False)):
            print(run(args, precision, chunk, checkpointing), flush=True)


if __name__ == "__main__":
    main()
