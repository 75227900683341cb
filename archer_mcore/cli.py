"""The `archer` command line: archer config | train | eval | plan | convert | submit.

Subcommands import their heavy modules lazily so that `archer --help` and config
checks stay fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from archer_mcore import __version__
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


#: Later subcommands register here: name -> (add_arguments, run).
_EXTRA: list[Callable[[argparse._SubParsersAction], None]] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="archer",
        description="archer-mcore: RLVR on megatron-core (Archer, forking tokens, DAPO, GRPO)",
    )
    parser.add_argument("--version", action="version", version=f"archer-mcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_config_parser(sub)
    for add in _EXTRA:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
