"""`archer plan`: will a config fit its cluster, and how long will a step take?

The command line of the planner: `add_args` declares the options, `run` prints the
plan (text or JSON) and, when the layout does not fit, the problems and the nearest
layout that does. Exit status: 0 fits, 1 does not fit, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import ConfigError, load_config
from archer_mcore.plan.report import _layout_diff, format_plan, plan_to_dict
from archer_mcore.plan.search import nearest_fitting, plan_config
from archer_mcore.plan.specs import GIB, GPU_SPECS, Assumptions


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _unit_fraction(text: str) -> float:
    """argparse type: a finite number in (0, 1] (a utilisation or a share)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "--nodes", type=_positive_int, default=None, help="nodes (default: slurm.nodes)"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=_positive_int,
        default=None,
        help="GPUs per node (default: slurm.gpus_per_node)",
    )
    parser.add_argument(
        "--gpu", choices=sorted(GPU_SPECS), default=None, help="GPU type (default: slurm.gpu_type)"
    )
    add_overrides(parser, "override a dotted config key (repeatable)")
    parser.add_argument(
        "--mfu",
        type=_unit_fraction,
        default=Assumptions.mfu_train,
        help="assumed training model-FLOPs utilisation",
    )
    parser.add_argument(
        "--mean-response-fraction",
        type=_unit_fraction,
        default=Assumptions.mean_response_fraction,
        help="assumed mean response length / rollout.max_new_tokens",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    """0: the layout fits; 1: it does not (with the nearest one that does); 2: bad input."""
    try:
        cfg = load_config(args.config, getattr(args, "override", []))
        assume = Assumptions(
            mfu_train=getattr(args, "mfu", Assumptions.mfu_train),
            mean_response_fraction=getattr(
                args, "mean_response_fraction", Assumptions.mean_response_fraction
            ),
        )
        plan = plan_config(
            cfg,
            args.config,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            gpu=args.gpu,
            assume=assume,
        )
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"archer plan: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        out = plan_to_dict(plan)
        if not plan.fits:
            alt = nearest_fitting(
                plan.model,
                plan.cluster,
                train=plan.train,
                roll=plan.rollout,
                work=plan.work,
                assume=assume,
            )
            out["suggestion"] = _layout_diff(plan, alt) if alt else None
        print(json.dumps(out, indent=2))
        return 0 if plan.fits else 1
    print(format_plan(plan, assume))
    if plan.fits:
        print("\nfits: yes")
        return 0
    print("\nDOES NOT FIT:", file=sys.stderr)
    for p in plan.problems:
        print(f"  - {p}", file=sys.stderr)
    alt = nearest_fitting(
        plan.model,
        plan.cluster,
        train=plan.train,
        roll=plan.rollout,
        work=plan.work,
        assume=assume,
    )
    if alt is None:
        print(
            f"  no layout of {plan.cluster.nodes} nodes fits; try more nodes (--nodes)",
            file=sys.stderr,
        )
    else:
        print("  nearest layout that fits: " + ", ".join(_layout_diff(plan, alt)), file=sys.stderr)
        print(
            f"    (training peak {alt.training.peak.total / GIB:.1f} GiB per GPU, "
            f"step ~{alt.time.total_s:.0f} s)",
            file=sys.stderr,
        )
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="archer plan", description=__doc__.splitlines()[0])
    add_args(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
