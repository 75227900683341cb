"""`archer plan CONFIG [--nodes N ...]`: per-GPU memory and step time of a layout.

A thin registration of the planner's own arguments and entry point
(`archer_mcore.planner.add_plan_args` / `run_plan`)."""

from __future__ import annotations

import argparse

from archer_mcore.planner import add_plan_args, run_plan


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer plan` (the planner's)."""
    add_plan_args(parser)


def run(args: argparse.Namespace) -> int:
    """`archer plan`: the planner's report; its exit code."""
    return int(run_plan(args))
