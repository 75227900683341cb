"""The `archer` command line: archer config | train | eval | export | plan | convert |
submit | data.

One module per verb in this package, each with `add_args(parser)` and `run(args)`.
The verb modules import only the standard library and the config at module level; what
a verb needs to run (torch, megatron, the trainer) is imported inside its `run`, so that
`archer --help`, `archer VERB --help` and `archer config show` stay fast and never load
torch (tests/test_cli_imports.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from archer_mcore import __version__, quiet_known_warnings
from archer_mcore.cli import config_cmd, convert, export, plan, submit, train
from archer_mcore.cli import data as data_cmd
from archer_mcore.cli import eval as eval_cmd
from archer_mcore.config import ConfigError

#: (verb, its module, the one-line help of `archer --help`), in the order listed there.
COMMANDS = (
    ("config", config_cmd, "inspect configs"),
    ("train", train, "run RL training from a YAML config"),
    ("eval", eval_cmd, "avg@k / pass@k of a checkpoint on a prompt file"),
    ("export", export, "a trained checkpoint as an HF checkpoint (transformers, SGLang)"),
    ("convert", convert, "convert weights HF <-> megatron"),
    ("plan", plan, "per-GPU memory and step time of a layout"),
    ("submit", submit, "render and submit a Slurm job"),
    ("data", data_cmd, "convert public datasets to prompt files; inspect prompt files"),
)


def build_parser() -> argparse.ArgumentParser:
    """The `archer` parser: one subcommand per entry of COMMANDS, its `run` as `func`."""
    parser = argparse.ArgumentParser(
        prog="archer",
        description="archer-mcore: RLVR on megatron-core (Archer, forking tokens, DAPO, GRPO)",
    )
    parser.add_argument("--version", action="version", version=f"archer-mcore {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        module.add_args(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), run the verb, return the exit code.

    A ConfigError (bad config key, flag or file) and a RunDirError (the output
    directory is in use or holds another run) print one line on stderr and return 2."""
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
