"""`archer convert --to-mcore | --to-hf --src DIR --dst DIR`: offline HF <-> megatron
checkpoint conversion (the files: `archer_mcore.model.convert_dirs`)."""

from __future__ import annotations

import argparse
import sys


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer convert`."""
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--to-mcore", action="store_true", help="HF safetensors -> megatron shards"
    )
    direction.add_argument("--to-hf", action="store_true", help="megatron shards -> HF safetensors")
    parser.add_argument("--src", required=True, help="source checkpoint directory")
    parser.add_argument("--dst", required=True, help="output directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (--to-mcore)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (--to-mcore)")
    parser.add_argument(
        "--te-names",
        action="store_true",
        help="use Transformer Engine parameter names (--to-mcore)",
    )
    parser.add_argument("--vocab-divisible-by", type=int, default=128)
    parser.add_argument("--shard-gb", type=float, default=5.0, help="HF shard size in GB (--to-hf)")


def run(args: argparse.Namespace) -> int:
    """Convert; 0 on success, 2 (with one line on stderr) for a missing or bad input."""
    from archer_mcore.model.convert_dirs import hf_to_mcore_dir, mcore_dir_to_hf

    try:
        if args.to_mcore:
            hf_to_mcore_dir(
                args.src,
                args.dst,
                tp=args.tp,
                pp=args.pp,
                te_names=args.te_names,
                vocab_divisible_by=args.vocab_divisible_by,
            )
        else:
            mcore_dir_to_hf(args.src, args.dst, int(args.shard_gb * 1024**3))
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"archer convert: error: {e}", file=sys.stderr)
        return 2
    print(f"archer convert: wrote {args.dst}")
    return 0
