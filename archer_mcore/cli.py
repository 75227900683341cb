"""The `archer` command line: archer config | train | eval | plan | convert | submit.

Subcommands import their heavy modules lazily so that `archer --help` and config
checks stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

from archer_mcore import __version__, quiet_known_warnings
from archer_mcore.config import ConfigError, dump_yaml, load_config


def _config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.override)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def _add_config_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="inspect configs")
    inner = p.add_subparsers(dest="config_command", required=True)
    show = inner.add_parser("show", help="print the fully resolved config as YAML")
    show.add_argument("config", help="YAML config file")
    show.add_argument(
        "--override",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted key, e.g. algorithm.clip_high=0.28 (repeatable)",
    )
    show.set_defaults(func=_config_show)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--override",
        "-o",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. train.steps=10 (repeatable)",
    )


def _single_process_rendezvous() -> None:
    """Outside torchrun/srun, rendezvous on a free local port (not a fixed 29500)."""
    import os
    import socket

    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if not launched and "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")


def _train(args: argparse.Namespace) -> int:
    import logging

    import torch

    from archer_mcore.actor.checkpoint_store import CheckpointError
    from archer_mcore.train.loop import NonFiniteLossError, train
    from archer_mcore.train.preflight import check_metrics_endpoint, preflight
    from archer_mcore.train.run_dir import (
        NonFiniteParametersError,
        RunDirLock,
        check_fresh_start,
        launch_rank,
    )

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
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        _single_process_rendezvous()
        try:
            summary = train(cfg, resume=args.resume)
        except (NonFiniteLossError, NonFiniteParametersError, CheckpointError) as exc:
            print(f"archer: training stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    return 0 if summary.stopped_by is None or summary.last_checkpoint else 1


def _eval(args: argparse.Namespace) -> int:
    from archer_mcore.train.eval_cli import run_eval

    return run_eval(args)


def _lazy(module: str, runner: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), runner)(args)

    return run


def _add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run RL training from a YAML config")
    p.add_argument("config", help="YAML config file")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints (and metrics.jsonl) of an earlier run in the output "
        "directory and start over; without it a fresh run there refuses to start",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="avg@k / pass@k of a checkpoint on a prompt file")
    p.add_argument("config", help="YAML config file (model, sampling defaults)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (or root)")
    p.add_argument("--data", required=True, action="append", help="JSONL/Parquet file(s)")
    p.add_argument("--samples", "-k", type=int, default=None, help="samples per prompt")
    p.add_argument("--out", default=None, help="JSON output path")
    _add_overrides(p)
    p.set_defaults(func=_eval)

    from archer_mcore.model.convert_cli import add_convert_args
    from archer_mcore.planner import add_plan_args
    from archer_mcore.slurm_submit import add_submit_args

    for name, help_text, add, module, runner in (
        (
            "convert",
            "convert weights HF <-> megatron",
            add_convert_args,
            "archer_mcore.model.convert_cli",
            "run_convert",
        ),
        (
            "plan",
            "per-GPU memory and step time of a layout",
            add_plan_args,
            "archer_mcore.planner",
            "run_plan",
        ),
        (
            "submit",
            "render and submit a Slurm job",
            add_submit_args,
            "archer_mcore.slurm_submit",
            "run_submit",
        ),
    ):
        p = sub.add_parser(name, help=help_text)
        add(p)
        p.set_defaults(func=_lazy(module, runner))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archer",
        description="archer-mcore: RLVR on megatron-core (Archer, forking tokens, DAPO, GRPO)",
    )
    parser.add_argument("--version", action="version", version=f"archer-mcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_config_parser(sub)
    _add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    quiet_known_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"archer: config error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from archer_mcore.train.run_dir import RunDirError

        if not isinstance(exc, RunDirError):
            raise
        print(f"archer: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
