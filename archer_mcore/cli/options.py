"""Arguments shared by several verbs."""

from __future__ import annotations

import argparse


def add_overrides(
    parser: argparse.ArgumentParser,
    help_text: str = "override a dotted config key, e.g. train.steps=10 (repeatable)",
) -> None:
    """`--override/-o KEY=VALUE` (repeatable, into `args.override`): dotted config keys
    set after the YAML."""
    parser.add_argument(
        "--override", "-o", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )
