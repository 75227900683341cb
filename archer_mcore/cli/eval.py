"""`archer eval CONFIG --checkpoint DIR --data FILE`: avg@k and pass@k of a checkpoint.

The policy is rebuilt from the config, the checkpoint's weights are loaded into it and
synced into the rollout engine, which samples k responses per prompt with the eval
settings (`eval.temperature`, `eval.top_p`, `eval.n_samples`). Results per data source
go to a JSON file and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from archer_mcore.cli.options import add_overrides
from archer_mcore.config import Config, ConfigError, load_config


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer eval`."""
    parser.add_argument("config", help="YAML config file (model, sampling defaults)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (or root)")
    parser.add_argument("--data", required=True, action="append", help="JSONL/Parquet file(s)")
    parser.add_argument("--samples", "-k", type=int, default=None, help="samples per prompt")
    parser.add_argument("--out", default=None, help="JSON output path")
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate the checkpoint; 0 when done (ranks > 0: once the weights are exported)."""
    from archer_mcore.parallel.distributed import single_process_rendezvous

    cfg, step_dir = _checked_inputs(args)  # before the tokenizer and the model load
    single_process_rendezvous()
    prompts, tokenizer, engine = _policy_in_engine(cfg, step_dir, args.data)
    if engine is None:
        return 0
    _evaluate(cfg, args, step_dir, prompts, tokenizer, engine)
    engine.shutdown()
    return 0


def _checked_inputs(args: argparse.Namespace) -> tuple[Config, Path]:
    """The config (with --samples) and the verified step directory to evaluate; a
    ConfigError naming the flag for a bad config, model path, data file or checkpoint."""
    from archer_mcore.actor.checkpoint_store import CheckpointError, resolve_checkpoint
    from archer_mcore.train.preflight import check_data_files, check_model_path

    cfg = load_config(args.config, args.override)
    if args.samples is not None:
        if args.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {args.samples}")
        cfg.eval.n_samples = args.samples
    check_model_path(cfg)
    check_data_files(args.data, "--data")
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"--checkpoint: {ckpt} does not exist")
    try:  # a step directory, or a root: its latest checkpoint
        step_dir, _ = resolve_checkpoint(ckpt)
    except CheckpointError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None
    return cfg, step_dir


def _policy_in_engine(
    cfg: Config, step_dir: Path, data_files: list[str]
) -> tuple[list[Any], Any, Any]:
    """(prompts, tokenizer, engine): the prompts of `data_files` with their rewards
    routed, and on rank 0 a rollout engine holding the checkpoint's weights (None on
    the other ranks, which only take part in the weight export)."""
    from archer_mcore.actor.checkpoint_store import CheckpointError
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.data.prepare import build_tokenizer, route_rewards
    from archer_mcore.data.prompt_dataset import PromptDataset
    from archer_mcore.parallel.ranks import rank
    from archer_mcore.train.components import _policy_config, build_engine, hf_config_dict

    tokenizer = build_tokenizer(cfg, Path(cfg.warmstart.cache_dir))
    data = PromptDataset.from_files(data_files, tokenizer, cfg.data.max_prompt_length)
    if len(data) == 0:
        raise ConfigError(f"--data: no usable prompt in {data_files}: {data.report.summary()}")
    data = route_rewards(cfg, data, "--data")
    hf_config = hf_config_dict(cfg, tokenizer)
    policy = MegatronPolicy.from_hf(cfg.model.path or hf_config, _policy_config(cfg))
    try:
        policy.load_checkpoint(step_dir)
    except CheckpointError as exc:  # e.g. a checkpoint of a model of another shape
        raise ConfigError(f"--checkpoint: {exc}") from None
    pad = tokenizer.pad_token_id or 0
    engine = build_engine(cfg, hf_config, pad) if rank() == 0 else None
    buckets = policy.export_hf_buckets(cfg.rollout.sync_bucket_bytes)
    if engine is None:
        for _ in buckets:
            pass
    else:
        engine.update_weights(buckets)
    return list(data), tokenizer, engine


def _evaluate(
    cfg: Config,
    args: argparse.Namespace,
    step_dir: Path,
    prompts: list[Any],
    tokenizer: Any,
    engine: Any,
) -> None:
    """Sample and score `eval.n_samples` responses per prompt; write the JSON (--out, else
    <output_dir>/eval/eval.json) and print the table with each source's reward faults."""
    from archer_mcore.rewards.scorer import RewardScorer
    from archer_mcore.train.eval_metrics import EVAL_PASS_KS, format_table, summarize
    from archer_mcore.train.sampling import eval_sampling_params
    from archer_mcore.train.scoring import score_groups

    e = cfg.eval
    params = eval_sampling_params(cfg)
    print(f"eval: {len(prompts)} prompts x {e.n_samples} samples from {step_dir}", file=sys.stderr)
    batch = engine.generate([p.prompt_ids for p in prompts], e.n_samples, params)
    with RewardScorer.from_config(cfg.rewards) as scorer:
        recorder = _RecordingScorer(scorer)
        groups = score_groups(recorder, tokenizer, prompts, batch)
    records = [(g.data_source, [c > 0 for c in g.correct]) for g in groups]
    summary = summarize(records, extra_ks=EVAL_PASS_KS)  # as the loop's periodic eval
    failures = _failures_by_source(groups, recorder.results)
    result = {"checkpoint": str(step_dir), "results": summary, "reward_failures": failures}
    out = _write_result(cfg, args.out, json.dumps(result, indent=2) + "\n")
    # The reward-failure count beside each accuracy: a response the reward could not
    # score (timeout, crash, no reward for its source) counts as wrong.
    table = {src: {**row, "reward_failures": failures.get(src, 0)} for src, row in summary.items()}
    print(format_table(table))
    if failures.get("all"):
        print(
            f"eval: {failures['all']} responses could not be scored (reward faults) and "
            "count as wrong",
            file=sys.stderr,
        )
    print(f"written: {out}", file=sys.stderr)


def _write_result(cfg: Config, out_arg: str | None, text: str) -> Path:
    """Write the JSON result to --out, else <output_dir>/eval/eval.json, by an atomic
    rename that never writes through a link (a link at the file's name is replaced, its
    target untouched); under the output directory, eval/ must not be a link either.
    Returns the path written."""
    from archer_mcore.utils.safe_files import UnsafePathError, check_plain_entry, write_atomic

    if out_arg:
        out = Path(out_arg)
    else:
        eval_dir = Path(cfg.train.output_dir) / "eval"
        try:
            check_plain_entry(eval_dir, directory=True)
        except UnsafePathError as exc:
            raise ConfigError(f"eval output: {exc}") from None
        out = eval_dir / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(out, text, durable=False)
    except UnsafePathError as exc:
        raise ConfigError(f"--out: {exc}") from None
    return out


class _RecordingScorer:
    """A RewardScorer that keeps every result of `score_batch`, in order."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.results: list[Any] = []

    def score_batch(self, requests: list[Any]) -> list[Any]:
        out = list(self.scorer.score_batch(requests))
        self.results.extend(out)
        return out


def _failures_by_source(groups: list[Any], results: list[Any]) -> dict[str, int]:
    """Reward faults per data source (and "all"); group i holds the next len(i) results."""
    counts: dict[str, int] = {"all": 0}
    it = iter(results)
    for g in groups:
        n = sum(bool(next(it).is_fault) for _ in g.samples)
        counts[g.data_source] = counts.get(g.data_source, 0) + n
        counts["all"] += n
    return counts
