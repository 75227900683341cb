"""`archer submit CONFIG --nodes N ...`: render the right sbatch script and submit it.

The command line here; the rendering, validation and `sbatch` call in
`archer_mcore.launch.slurm`. Each flag falls back to the config (the key in [brackets] in
`archer submit --help`). `--dry-run` prints the script; otherwise it is saved under
--log-dir (a record of exactly what ran) and passed to `sbatch`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import ConfigError, load_config
from archer_mcore.launch import slurm


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer submit`."""
    p = parser
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("--nodes", "-N", type=int, help="nodes in the job [slurm.nodes]")
    p.add_argument(
        "--mode", choices=slurm.MODES, help="script to use [from the config's rollout section]"
    )
    p.add_argument(
        "--rollout-nodes",
        type=int,
        help="disaggregated: nodes running SGLang [slurm.rollout_nodes]",
    )
    p.add_argument(
        "--gpus-per-node", type=int, help="GPUs per node, 0 for CPU [slurm.gpus_per_node]"
    )
    p.add_argument(
        "--nproc-per-node", type=int, help="trainer processes per node [GPUs per node, or 1]"
    )
    p.add_argument(
        "--cpus-per-task", type=int, default=0, help="CPUs for each node's torchrun task"
    )
    p.add_argument("--partition", "-p", help="[slurm.partition]")
    p.add_argument("--account", "-A", help="[slurm.account]")
    p.add_argument("--time", "-t", help="time limit, e.g. 24:00:00 [slurm.time]")
    p.add_argument("--job-name", "-J", help="[archer-<train.run_name>]")
    p.add_argument(
        "--log-dir", default="slurm-logs", help="job logs and rendered scripts [slurm-logs]"
    )
    p.add_argument(
        "--signal-lead",
        type=int,
        default=600,
        metavar="SECONDS",
        help="SIGUSR1 this long before the time limit: checkpoint and requeue [600]",
    )
    p.add_argument("--container-image", help="pyxis/enroot image for srun [slurm.container_image]")
    p.add_argument("--container-mounts", default="", help="pyxis --container-mounts")
    p.add_argument("--pushgateway", default=None, help="Pushgateway URL [metrics.pushgateway]")
    p.add_argument("--python", default=sys.executable, help="python on the nodes [this python]")
    p.add_argument("--home", default=None, help="working directory on the nodes [current dir]")
    p.add_argument("--entry", default="", help=argparse.SUPPRESS)  # tests: a stand-in program
    p.add_argument(
        "--sglang-model", default=None, help="disaggregated: server --model-path [model.path]"
    )
    add_overrides(p, "config override passed to the trainer (repeatable)")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra sbatch flag, e.g. --sbatch=--qos=high (repeatable) [slurm.extra_sbatch]",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the job, e.g. NCCL_IB_HCA=mlx5 (repeatable)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the rendered script, submit nothing"
    )
    p.add_argument(
        "--test-only",
        action="store_true",
        help="sbatch --test-only: let Slurm validate the job without queueing it",
    )


def _pick(cli: Any, cfg_value: Any) -> Any:
    """The command line's value, else (when the flag was not given) the config's."""
    return cfg_value if cli is None else cli


def request_from_args(args: argparse.Namespace) -> slurm.SubmitRequest:
    """Merge the command line with the config's slurm / rollout / metrics sections."""
    cfg = load_config(args.config, args.override)
    mode = args.mode or slurm.choose_mode(cfg)
    gpus = _pick(args.gpus_per_node, cfg.slurm.gpus_per_node)
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise slurm.SubmitError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    req = slurm.SubmitRequest(
        config=Path(args.config).resolve(),
        mode=mode,
        nodes=_pick(args.nodes, cfg.slurm.nodes),
        rollout_nodes=_pick(args.rollout_nodes, cfg.slurm.rollout_nodes),
        gpus_per_node=gpus,
        nproc_per_node=_pick(args.nproc_per_node, gpus if gpus > 0 else 1),
        cpus_per_task=args.cpus_per_task,
        partition=_pick(args.partition, cfg.slurm.partition),
        account=_pick(args.account, cfg.slurm.account),
        time=_pick(args.time, cfg.slurm.time),
        job_name=args.job_name or f"archer-{cfg.train.run_name}",
        log_dir=Path(args.log_dir).resolve(),
        signal_lead_s=args.signal_lead,
        container_image=_pick(args.container_image, cfg.slurm.container_image),
        container_mounts=args.container_mounts,
        pushgateway=_pick(args.pushgateway, cfg.metrics.pushgateway),
        python=args.python,
        home=Path(args.home).resolve() if args.home else Path.cwd(),
        entry=args.entry,
        sglang_model=_pick(args.sglang_model, cfg.model.path),
        sglang_tp=cfg.rollout.sglang.tp_size,
        sglang_port=cfg.rollout.sglang.base_port,
        router_port=cfg.rollout.sglang.router_port,
        router_policy=cfg.rollout.sglang.router_policy,
        sglang_dtype=cfg.rollout.sglang.dtype,
        sglang_mem_fraction=cfg.rollout.sglang.mem_fraction_static,
        overrides=list(args.override),
        extra_sbatch=[*cfg.slurm.extra_sbatch, *args.sbatch],
        env=env,
    )
    slurm.validate(req)
    return req


def run(args: argparse.Namespace) -> int:
    """`archer submit`: print the script (--dry-run) or submit it; the exit code."""
    try:
        req = request_from_args(args)
    except (slurm.SubmitError, ConfigError) as exc:
        print(f"archer submit: {exc}", file=sys.stderr)
        return 2
    script = slurm.render_script(req)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    rc, message = slurm.submit(script, req, test_only=args.test_only)
    print(message, file=sys.stderr if rc else sys.stdout)
    return rc
