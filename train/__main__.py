r"""Train a CLIP model.

One process (CPU or one GPU):
    python -m train --recipe smoke
One node, N processes (gloo on CPU, nccl on GPU):
    torchrun --standalone --nproc_per_node=N -m train --recipe demo
Two nodes (run on each; NODE_RANK 0 and 1, HOST the first node's address):
    torchrun --nnodes=2 --node_rank=NODE_RANK --nproc_per_node=8 \
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m train --recipe default --set ...
Any field can be changed: --set data.batch_size_per_rank=256 --set optim.lr=5e-4
Continue an interrupted run from its latest checkpoint: add --resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from common.config import apply_overrides, to_dict
from train.config import RECIPES, TrainConfig


def parse_args(argv: Sequence[str] | None) -> tuple[TrainConfig, bool]:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="a.b=v",
        help="override a config field (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in run_dir, if any",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(RECIPES[args.recipe](), args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    if args.print_config:
        import json

        print(json.dumps(to_dict(cfg), indent=2))
        sys.exit(0)
    return cfg, args.resume


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # open_clip logs its details on the root logger; ours are INFO on rank 0 only
    for name in ("common", "train"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> None:
    cfg, resume = parse_args(argv)
    setup_logging()
    from train.trainer import Trainer  # heavy imports after argument errors are reported

    try:
        trainer = Trainer(cfg, resume=resume)
    except (ValueError, FileNotFoundError) as exc:  # bad config, data or weights: no traceback
        logging.getLogger("train").error("cannot start training: %s", exc)
        sys.exit(2)
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
