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

from archer_mcore.config import ConfigError, load_config


def run_eval(args: argparse.Namespace) -> int:
    from archer_mcore.cli import _single_process_rendezvous
    from archer_mcore.data.prepare import build_tokenizer, route_rewards
    from archer_mcore.data.prompt_dataset import PromptDataset
    from archer_mcore.parallel.ranks import rank
    from archer_mcore.train.checkpoint import (
        CheckpointError,
        find_latest_checkpoint,
        verify_checkpoint,
    )
    from archer_mcore.train.components import _policy_config, build_engine, hf_config_dict
    from archer_mcore.train.eval_metrics import EVAL_PASS_KS, format_table, summarize
    from archer_mcore.train.policy import MegatronPolicy
    from archer_mcore.train.sampling import eval_sampling_params
    from archer_mcore.train.scoring import score_groups

    cfg = load_config(args.config, args.override)
    if args.samples is not None:
        if args.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {args.samples}")
        cfg.eval.n_samples = args.samples
    from archer_mcore.train.preflight import check_data_files, check_model_path

    check_model_path(cfg)  # before the tokenizer and the model load
    check_data_files(args.data, "--data")
    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        raise ConfigError(f"--checkpoint: {ckpt} does not exist")
    if (ckpt / "MANIFEST.json").exists() or ckpt.name.startswith("step_"):
        step_dir = ckpt
    else:
        found = find_latest_checkpoint(ckpt)
        if found is None:
            raise ConfigError(f"--checkpoint: no finished checkpoint under {ckpt}")
        step_dir = found
    try:
        verify_checkpoint(step_dir)
    except CheckpointError as exc:
        raise ConfigError(f"--checkpoint: {exc}") from None

    _single_process_rendezvous()
    tokenizer = build_tokenizer(cfg, Path(cfg.warmstart.cache_dir))
    data = PromptDataset.from_files(args.data, tokenizer, cfg.data.max_prompt_length)
    if len(data) == 0:
        raise ConfigError(f"--data: no usable prompt in {args.data}: {data.report.summary()}")
    data = route_rewards(cfg, data, "--data")
    hf_config = hf_config_dict(cfg, tokenizer)
    pcfg = _policy_config(cfg)
    policy = MegatronPolicy.from_hf(cfg.model.path or hf_config, pcfg)
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
        return 0
    engine.update_weights(buckets)

    from archer_mcore.rewards.scorer import RewardScorer

    e = cfg.eval
    params = eval_sampling_params(cfg)
    prompts = list(data)
    print(f"eval: {len(prompts)} prompts x {e.n_samples} samples from {step_dir}", file=sys.stderr)
    batch = engine.generate([p.prompt_ids for p in prompts], e.n_samples, params)
    with RewardScorer.from_config(cfg.rewards) as scorer:
        recorder = _RecordingScorer(scorer)
        groups = score_groups(recorder, tokenizer, prompts, batch)
    records = [(g.data_source, [c > 0 for c in g.correct]) for g in groups]
    summary = summarize(records, extra_ks=EVAL_PASS_KS)  # as the loop's periodic eval
    failures = _failures_by_source(groups, recorder.results)
    out = Path(args.out) if args.out else Path(cfg.train.output_dir) / "eval" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(step_dir), "results": summary, "reward_failures": failures}
    out.write_text(json.dumps(result, indent=2) + "\n")
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
    engine.shutdown()
    return 0


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
