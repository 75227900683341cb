"""`archer submit CONFIG --nodes N ...`: render the right sbatch script and submit it.

The command line here; the rendering, validation and `sbatch` call in
`archer_mcore.launch.slurm`. Each flag falls back to the config (the key in [brackets] in
`archer submit --help`). `--dry-run` prints the script; otherwise it is saved under
--log-dir (a record of exactly what ran) and passed to `sbatch`.

The signal lead (`--signal=B:USR1@LEAD`, how long before the time limit the trainer is
told to stop and checkpoint) is derived from the planner when neither `--signal-lead`
nor `slurm.signal_lead_s` sets it: the longest phase the trainer finishes before it can
save, plus the checkpoint's write time at `checkpoint.write_gb_per_s`, with a margin
(archer_mcore/plan/stop.py). A configured lead shorter than that gets a warning naming
both numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import Config, ConfigError, load_config
from archer_mcore.launch import slurm
from archer_mcore.plan.search import plan_config
from archer_mcore.plan.stop import (
    SLURM_MAX_SIGNAL_LEAD_S,
    SignalLead,
    checkpoint_save_s,
    signal_lead,
)

#: The lead when the planner cannot estimate one (a CPU job, a model shape it cannot read).
FALLBACK_SIGNAL_LEAD_S = 600


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
        default=None,
        metavar="SECONDS",
        help="SIGUSR1 this long before the time limit: checkpoint and requeue "
        "[slurm.signal_lead_s; 0 or unset: derived from the plan]",
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


def derived_signal_lead(
    cfg: Config, config_path: str | Path, nodes: int, gpus_per_node: int
) -> tuple[SignalLead | None, str]:
    """The planner's signal lead for this job (plan/stop.py), or (None, why not)."""
    try:
        plan = plan_config(cfg, config_path, nodes=nodes, gpus_per_node=gpus_per_node)
        save_s = checkpoint_save_s(plan.model, cfg.checkpoint.write_gb_per_s)
    except (ConfigError, OSError, ValueError) as exc:
        return None, str(exc)
    return signal_lead(plan.time, save_s), ""


def choose_signal_lead(
    args: argparse.Namespace, cfg: Config, *, nodes: int, gpus_per_node: int, time_limit: str
) -> tuple[int, list[str]]:
    """The job's signal lead in seconds and what to tell the user about it: the
    configured one (`--signal-lead`, else `slurm.signal_lead_s` when > 0), with a warning
    when it is shorter than the plan's; else the plan's (`FALLBACK_SIGNAL_LEAD_S` when
    there is no plan, e.g. a CPU job)."""
    configured = _pick(args.signal_lead, cfg.slurm.signal_lead_s or None)
    key = "--signal-lead" if args.signal_lead is not None else "slurm.signal_lead_s"
    derived, why = derived_signal_lead(cfg, args.config, nodes, gpus_per_node)
    if configured is not None:
        if derived is not None and configured < derived.lead_s:
            return configured, [
                f"warning: {key} = {configured} s is shorter than the {derived.lead_s} s "
                f"the plan says a stop needs ({derived.describe()}); Slurm may kill the job "
                f"before its checkpoint is written. Raise {key}, or leave "
                "slurm.signal_lead_s at 0 to use the derived lead"
            ]
        return configured, []
    if derived is None:
        return FALLBACK_SIGNAL_LEAD_S, [
            f"signal lead {FALLBACK_SIGNAL_LEAD_S} s (no plan for this job: {why}); set "
            "slurm.signal_lead_s to choose it"
        ]
    lead = min(derived.lead_s, SLURM_MAX_SIGNAL_LEAD_S)
    try:
        limit = slurm.slurm_time_seconds(time_limit)
    except ValueError:
        limit = None  # slurm.validate names the bad time limit
    if limit is not None and lead >= limit:
        raise slurm.SubmitError(
            f"the signal lead derived from the plan, {derived.describe()}, is not shorter "
            f"than the time limit {time_limit} ({limit} s): raise --time / slurm.time, or "
            "set --signal-lead / slurm.signal_lead_s (Slurm may then kill the job before "
            "its checkpoint is written)"
        )
    return lead, [f"signal lead {derived.describe()}"]


def request_from_args(args: argparse.Namespace) -> slurm.SubmitRequest:
    """Merge the command line with the config's slurm / rollout / metrics sections."""
    cfg = load_config(args.config, args.override)
    mode = args.mode or slurm.choose_mode(cfg)
    gpus = _pick(args.gpus_per_node, cfg.slurm.gpus_per_node)
    nodes = _pick(args.nodes, cfg.slurm.nodes)
    time_limit = _pick(args.time, cfg.slurm.time)
    lead, notes = choose_signal_lead(
        args, cfg, nodes=nodes, gpus_per_node=gpus, time_limit=time_limit
    )
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise slurm.SubmitError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    req = slurm.SubmitRequest(
        config=Path(args.config).resolve(),
        mode=mode,
        nodes=nodes,
        rollout_nodes=_pick(args.rollout_nodes, cfg.slurm.rollout_nodes),
        gpus_per_node=gpus,
        nproc_per_node=_pick(args.nproc_per_node, gpus if gpus > 0 else 1),
        cpus_per_task=args.cpus_per_task,
        partition=_pick(args.partition, cfg.slurm.partition),
        account=_pick(args.account, cfg.slurm.account),
        time=time_limit,
        job_name=args.job_name or f"archer-{cfg.train.run_name}",
        log_dir=Path(args.log_dir).resolve(),
        signal_lead_s=lead,
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
    # (after the checks: a refused request prints its error alone)
    for note in notes:
        print(f"archer submit: {note}", file=sys.stderr)
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
