"""`archer config show CONFIG [-o KEY=VALUE ...] [--doc]`: print the fully resolved config."""

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
    show.add_argument(
        "--doc",
        action="store_true",
        help="put each documented key's documentation above it, as YAML comments",
    )


def run(args: argparse.Namespace) -> int:
    """`archer config show`: the config with every default filled in, as YAML on stdout
    (with --doc, the fields' documentation as comments)."""
    cfg = load_config(args.config, args.override)
    sys.stdout.write(dump_yaml(cfg, docs=args.doc))
    return 0
