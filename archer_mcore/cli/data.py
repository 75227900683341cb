"""`archer data`: public datasets in, the trainer's rows out, and what a prompt file holds.

    archer data prepare SOURCE --input PATH --out FILE   # e.g. SOURCE = math500
    archer data inspect FILE [FILE ...] [--config CONFIG]

`prepare` converts a local copy of a dataset, in the format it is published in on the
Hugging Face hub, into the verl-style rows the trainer reads (data_source set so that
the reward registry routes each row); nothing is downloaded. SOURCEs, their published
formats and the output schema: docs/data.md and `archer_mcore.data.sources`. A bad
record stops the conversion with its file, line and field (--skip-bad lists and skips
it instead); the output is written atomically, so a failed run leaves nothing at --out.

`inspect` reads prompt files as the trainer does and prints counts per data_source and
reward kind, prompt and answer length histograms in tokens (the config's tokenizer; the
demo's arithmetic tokenizer when the config names no model), the malformed rows with
file:line, and how many prompts exceed data.max_prompt_length and the model's context.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import Config, ConfigError, load_config

#: The SOURCE names (archer_mcore.data.sources.SOURCES is the registry; this copy keeps
#: `archer data --help` free of non-stdlib imports, and a test checks they agree).
SOURCE_NAMES = (
    "dapo-math-17k",
    "aime2024",
    "aime2025",
    "math500",
    "deepscaler",
    "livecodebench",
    "archer-code",
)


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer data prepare` and `archer data inspect`."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = sub.add_parser("prepare", help="convert a published dataset to the trainer's rows")
    prep.add_argument("source", metavar="SOURCE", help=f"one of: {', '.join(SOURCE_NAMES)}")
    prep.add_argument("--input", required=True, help="local file or directory, as published")
    prep.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    prep.add_argument(
        "--skip-bad", action="store_true", help="skip (and list) bad records instead of stopping"
    )
    prep.add_argument("--keep-duplicates", action="store_true", help="math: keep repeated problems")
    prep.add_argument("--since", default="", help="livecodebench: contest_date >= YYYY-MM-DD")
    prep.add_argument("--until", default="", help="livecodebench: contest_date < YYYY-MM-DD")
    prep.add_argument(
        "--decode-string-pickles",
        action="store_true",
        help="livecodebench: read base64+zlib+pickle private tests with a string-only "
        "opcode reader (never unpickled)",
    )
    prep.add_argument(
        "--public-tests-only",
        action="store_true",
        help="livecodebench: leave the private tests out",
    )
    prep.set_defaults(data_func=_prepare)
    insp = sub.add_parser("inspect", help="counts, token lengths and bad rows of prompt files")
    insp.add_argument("files", nargs="+", metavar="FILE", help="JSONL/Parquet prompt file(s)")
    insp.add_argument(
        "--config", default=None, help="YAML config (tokenizer, limits); default: built-ins"
    )
    insp.add_argument("--json", default=None, help="also write the report as JSON here")
    add_overrides(insp)
    insp.set_defaults(data_func=_inspect)


def run(args: argparse.Namespace) -> int:
    """Run the ACTION; a bad input prints one line naming the file, line and field and
    returns 2."""
    from archer_mcore.data.sources.base import SourceError
    from archer_mcore.utils.safe_files import UnsafePathError

    try:
        return int(args.data_func(args))
    except (SourceError, UnsafePathError) as exc:
        print(f"archer data: {exc}", file=sys.stderr)
        return 2


def _options(args: argparse.Namespace) -> dict[str, object]:
    """The source-specific options given on the command line (flags left at their
    defaults are not passed; one a SOURCE does not take is an error)."""
    given = {
        "keep_duplicates": args.keep_duplicates,
        "since": args.since,
        "until": args.until,
        "decode_string_pickle": args.decode_string_pickles,
        "public_only": args.public_tests_only,
    }
    return {k: v for k, v in given.items() if v}


def _prepare(args: argparse.Namespace) -> int:
    from archer_mcore.data.sources import SOURCES, prepare

    if args.source not in SOURCES:
        raise ConfigError(f"unknown SOURCE {args.source!r}; known: {', '.join(SOURCES)}")
    for flag in ("since", "until"):
        value = getattr(args, flag)
        if value and not (len(value) == 10 and value[4] == "-" and value[7] == "-"):
            raise ConfigError(f"--{flag} must be a date YYYY-MM-DD, got {value!r}")
    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".parquet"):
        raise ConfigError(f"--out {out}: name a .jsonl or .parquet file")
    result = prepare(
        args.source, source_path=args.input, out=out, skip_bad=args.skip_bad, **_options(args)
    )
    for line in result.skipped:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"{args.source}: {result.summary()} -> {out}", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from archer_mcore.data.sources.report import format_report, inspect_files

    cfg = load_config(args.config, args.override) if args.config else Config()
    if args.override and not args.config:
        raise ConfigError("--override needs --config")
    for f in args.files:
        if not Path(f).is_file():
            raise ConfigError(f"FILE {f}: no such file")
    with tempfile.TemporaryDirectory(prefix="archer-data-") as scratch:
        tokenizer = _tokenizer(cfg, Path(scratch))
        report = inspect_files(list(args.files), cfg, tokenizer)
    print(format_report(report, cfg))
    if args.json:
        from archer_mcore.utils.safe_files import write_atomic

        write_atomic(args.json, json.dumps(report.to_dict(), indent=1) + "\n")
    return 0


def _tokenizer(cfg: Config, scratch: Path) -> object:
    """The config's tokenizer: model.tokenizer or model.path's, else the demo's
    arithmetic tokenizer (built in `scratch`)."""
    from archer_mcore.data.prepare import build_tokenizer

    return build_tokenizer(cfg, scratch)
