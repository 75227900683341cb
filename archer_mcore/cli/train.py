"""`archer train CONFIG [-o KEY=VALUE ...] [--resume | --overwrite]`: RL training."""

from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from pathlib import Path

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import load_config

#: Errors of the disk under a run file: the run stops with one line, not a traceback.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EACCES, errno.EROFS})


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer train`."""
    parser.add_argument("config", help="YAML config file")
    add_overrides(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints (and metrics.jsonl) of an earlier run in the output "
        "directory and start over; without it a fresh run there refuses to start",
    )


def run(args: argparse.Namespace) -> int:
    """Check the config and the run directory, then train. Exit code 0 when the run
    finished (or stopped with a checkpoint to resume from), 1 when it stopped without."""
    import logging

    import torch

    from archer_mcore.actor.checkpoint_store import CheckpointError
    from archer_mcore.parallel.distributed import single_process_rendezvous
    from archer_mcore.train.log import launch_rank
    from archer_mcore.train.loop import NonFiniteLossError, train
    from archer_mcore.train.preflight import check_metrics_endpoint, preflight
    from archer_mcore.train.run_dir import (
        NonFiniteParametersError,
        RunDirLock,
        check_fresh_start,
        check_run_files,
    )
    from archer_mcore.utils.safe_files import UnsafePathError

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("archer").setLevel(logging.INFO)
    cfg = load_config(args.config, args.override)  # fails here, before any expensive work
    main_rank = launch_rank() == 0
    preflight(cfg)  # model.path, data files: before the tokenizer and the model load
    if main_rank:
        check_metrics_endpoint(cfg)  # the exporter lives on rank 0
    # One run per output directory (rank 0 holds the lock until it exits), and no fresh
    # run into another run's checkpoints.
    out = Path(cfg.train.output_dir)
    ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else out / "checkpoints"
    inside = ckpt_root.resolve().is_relative_to(out.resolve())
    locked = [out] if inside else [out, ckpt_root]  # a separate checkpoint.dir is locked too
    locks = [RunDirLock(d) for d in locked] if main_rank else []
    with contextlib.ExitStack() as stack:
        for lock in locks:
            stack.enter_context(lock)
        check_fresh_start(ckpt_root, out, args.resume, args.overwrite, delete=main_rank)
        check_run_files(out, ckpt_root)  # no planted link where the run will write
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        single_process_rendezvous()
        try:
            summary = train(cfg, resume=args.resume)
        except (
            NonFiniteLossError,
            NonFiniteParametersError,
            CheckpointError,
            UnsafePathError,
        ) as exc:
            print(f"archer: training stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:  # a run file (metrics.jsonl, ...) on a full or failing disk
            if exc.errno not in DISK_ERRNOS:
                raise
            print(f"archer: training stopped: {_disk_error(exc, ckpt_root)}", file=sys.stderr)
            return 1
    return 0 if summary.stopped_by is None or summary.last_checkpoint else 1


def _disk_error(exc: OSError, ckpt_root: Path) -> str:
    """One line for a failed write: the path, the error, and the newest checkpoint that
    is still valid (sizes checked, not checksums: the disk may be full)."""
    from archer_mcore.actor.checkpoint_store import CheckpointError, latest_valid_checkpoint

    try:
        valid = latest_valid_checkpoint(ckpt_root, checksums=False)
    except (CheckpointError, OSError):
        valid = None
    where = f"writing {exc.filename}: " if exc.filename else ""
    return (
        f"OSError: {where}[Errno {exc.errno}] {exc.strerror}; the newest checkpoint still "
        f"valid: {valid or 'none'} (fix the disk, then --resume continues from it)"
    )
