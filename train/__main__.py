r"""Train a CLIP model.

One process (CPU or one GPU):
    python -m train --recipe smoke
One node, N processes (gloo on CPU, nccl on GPU):
    torchrun --standalone --nproc_per_node=N -m train --recipe demo
Two nodes (run on each; NODE_RANK 0 and 1, HOST the first node's address):
    torchrun --nnodes=2 --node_rank=NODE_RANK --nproc_per_node=8 \
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 -m train --recipe default --set ...
Any field can be changed: --set data.batch_size_per_rank=256 --set optim.lr=5e-4
Continue an interrupted run from its latest checkpoint: add --resume (a first start with
--resume and no checkpoint starts at step 0, so one command serves every (re)start).
Go back to a chosen checkpoint: --resume RUN_DIR/checkpoints/last-good.pt or --resume-step N.

Exit status: 0 done; 2 the run could not start (bad config, data, weights, or run_dir in use or
holding another run's checkpoints); 1 it failed while running (one line here, the traceback in
RUN_DIR/logs/rank-R.log, or here with --debug); 128+N stopped by signal N (SIGTERM: 143,
SIGUSR1: 138) after saving a checkpoint at the step it was on.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import apply_overrides, to_dict
from train.config import RECIPES, TrainConfig

log = logging.getLogger("train")


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How this start relates to run_dir's state, and how failures are reported."""

    resume: bool | Path = False
    """True: the newest readable checkpoint (none: step 0); a path: that checkpoint."""
    overwrite: bool = False
    debug: bool = False


def _parser() -> argparse.ArgumentParser:
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
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="PATH",
        help="continue from the latest checkpoint in run_dir, if any, or from PATH",
    )
    start.add_argument(
        "--resume-step", type=int, metavar="N", help="continue from run_dir's checkpoint of step N"
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints, metrics and artifact of an earlier run in run_dir first",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print tracebacks of failures on the console too"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[TrainConfig, RunOptions]:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(RECIPES[args.recipe](), args.overrides)
    except ValueError as exc:
        parser.error(str(exc))
    if args.print_config:
        import json

        print(json.dumps(to_dict(cfg), indent=2))
        sys.exit(0)
    resume: bool | Path = bool(args.resume)
    if isinstance(args.resume, str):
        resume = Path(args.resume)
    elif args.resume_step is not None:
        from train.checkpoint import checkpoint_path

        resume = checkpoint_path(Path(cfg.run_dir) / "checkpoints", args.resume_step)
    return cfg, RunOptions(resume=resume, overwrite=args.overwrite, debug=args.debug)


class _OneLine(logging.Formatter):
    """Console records without their traceback: it goes to RUN_DIR/logs/ (or shows with --debug)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def setup_logging(*, debug: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    form = f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(form) if debug else _OneLine(form))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # open_clip logs its details on the root logger; ours are INFO on rank 0 only
    for name in ("common", "train"):
        logging.getLogger(name).setLevel(logging.INFO if rank == 0 else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> None:
    cfg, options = parse_args(argv)
    setup_logging(debug=options.debug)
    from train.preemption import die_with_launcher, exit_code

    die_with_launcher()
    from train.trainer import Trainer  # heavy imports after argument errors are reported

    handlers = list(logging.getLogger().handlers)
    try:
        trainer = Trainer(cfg, resume=options.resume, overwrite=options.overwrite)
    except Exception as exc:  # bad config, data, weights, device or run_dir: one line
        log.error("cannot start training: %s", _one_line(exc), exc_info=True)
        for added in set(logging.getLogger().handlers) - set(handlers):  # RUN_DIR/logs/
            logging.getLogger().removeHandler(added)
            added.close()
        sys.exit(2)
    try:
        trainer.train()
    except Exception as exc:
        log.error("training failed after step %d: %s", trainer.step, _one_line(exc), exc_info=True)
        sys.exit(1)
    finally:
        trainer.close()
    if trainer.stopped_by:
        sys.exit(exit_code(trainer.stopped_by))


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line, with its type where the message alone is vague."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    ours = type(exc).__module__.startswith(("train.", "common."))
    if ours or isinstance(exc, ValueError | OSError | FloatingPointError):
        return text
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    main()
