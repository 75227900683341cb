"""`archer config show CONFIG [-o KEY=VALUE ...]`: print the fully resolved config."""

from __future__ import annotations

import argparse
import sys

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import dump_yaml, load_config


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer config` (one inner command: show)."""
    inner = parser.add_subparsers(dest="config_command", required=True)
    show = inner.add_parser("show", help="print the fully resolved config as YAML")
    show.add_argument("config", help="YAML config file")
    add_overrides(show, "override a dotted key, e.g. algorithm.clip_high=0.28 (repeatable)")


def run(args: argparse.Namespace) -> int:
    """`archer config show`: the config with every default filled in, as YAML on stdout."""
    cfg = load_config(args.config, args.override)
    sys.stdout.write(dump_yaml(cfg))
    return 0
