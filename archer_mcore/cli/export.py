"""`archer export CONFIG --checkpoint DIR --out HF_DIR`: a trained checkpoint as an HF
checkpoint (safetensors, config.json, the tokenizer) that transformers and SGLang load.

The policy is rebuilt from the config (as `archer train` and `archer eval` do), the
checkpoint's weights are loaded into it, and its HF export (the same buckets the weight
sync sends to the rollout servers) is written through `write_hf_checkpoint`, which
writes a ``.partial`` sibling and renames it into place: an interrupted export leaves
no half-written model at --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from archer_mcore.cli.options import add_overrides, checkpoint_step_dir, policy_from_checkpoint
from archer_mcore.config import Config, ConfigError, load_config


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer export`."""
    parser.add_argument("config", help="the run's YAML config (model shape, tokenizer)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (or root)")
    parser.add_argument("--out", required=True, help="HF checkpoint directory to create")
    parser.add_argument(
        "--shard-gb", type=float, default=5.0, help="safetensors shard size in GB [5]"
    )
    add_overrides(parser)


def _checked_inputs(args: argparse.Namespace) -> tuple[Config, Path, Path]:
    """(config, verified step directory, output directory); a ConfigError naming the
    flag for a bad config, checkpoint or output path."""
    from archer_mcore.train.preflight import check_model_path

    cfg = load_config(args.config, args.override)
    check_model_path(cfg)
    if not args.shard_gb > 0:
        raise ConfigError(f"--shard-gb must be > 0, got {args.shard_gb}")
    step_dir = checkpoint_step_dir(args.checkpoint)
    out = Path(args.out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"--out: {out} already exists; name a new directory")
    return cfg, step_dir, out


def run(args: argparse.Namespace) -> int:
    """Export; 0 when written (ranks > 0: once they took part in the export)."""
    from archer_mcore.data.prepare import build_tokenizer
    from archer_mcore.model.hf_io import write_hf_checkpoint
    from archer_mcore.model.weights import bucketize
    from archer_mcore.parallel.distributed import single_process_rendezvous
    from archer_mcore.parallel.ranks import rank

    cfg, step_dir, out = _checked_inputs(args)  # before the tokenizer and the model load
    single_process_rendezvous()
    tokenizer = build_tokenizer(cfg, Path(cfg.warmstart.cache_dir))
    policy, hf_config = policy_from_checkpoint(cfg, step_dir, tokenizer)
    print(f"export: {step_dir} -> {out}", file=sys.stderr)
    buckets = policy.export_hf_buckets(cfg.rollout.sync_bucket_bytes)
    if rank() != 0:  # the other ranks only take part in the gather
        for _ in buckets:
            pass
        return 0
    tensors = (item for bucket in buckets for item in bucket)
    shards = bucketize(tensors, int(args.shard_gb * 1024**3))
    write_hf_checkpoint(shards, out, config=hf_config, single_file=True)
    tokenizer.save_pretrained(str(out))
    print(f"written: {out}", file=sys.stderr)
    return 0
