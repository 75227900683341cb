"""`archer eval CONFIG --checkpoint DIR --data FILE`: avg@k and pass@k of a checkpoint.

The policy is rebuilt from the config, the checkpoint's weights are loaded into it and
synced into the rollout engine, which samples k responses per prompt with the eval
settings (`eval.temperature`, `eval.top_p`, `eval.n_samples`). Results per data source
go to a JSON file, a markdown file beside it (same name, .md) and a table on stdout.

`--recipe NAME|PATH` (configs/eval/NAME.yaml, e.g. aime2024, math500, livecodebench)
sets the eval settings a benchmark's paper reports (k, temperature, top-p, max response
length) over the config's `eval.*`; explicit flags win over the recipe (`--samples`,
`-o eval.KEY=VALUE`). The config still gives the model. See docs/eval.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from archer_mcore.cli.options import add_overrides, checkpoint_step_dir, policy_from_checkpoint
from archer_mcore.config import Config, ConfigError, load_config


def add_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `archer eval`."""
    parser.add_argument("config", help="YAML config file (model, sampling defaults)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (or root)")
    parser.add_argument("--data", required=True, action="append", help="JSONL/Parquet file(s)")
    parser.add_argument("--samples", "-k", type=int, default=None, help="samples per prompt")
    parser.add_argument("--out", default=None, help="JSON output path (the table: same name, .md)")
    parser.add_argument(
        "--recipe",
        default=None,
        help="benchmark recipe: a name under configs/eval/ (aime2024, aime2025, math500, "
        "livecodebench, livecodebench_v6) or a YAML path; sets eval.* (explicit flags win)",
    )
    parser.add_argument(
        "--chunk-prompts",
        type=int,
        default=None,
        help="prompts per generate call, with a progress line after each (default: the "
        "recipe's, else 0: one call)",
    )
    add_overrides(parser)


def run(args: argparse.Namespace) -> int:
    """Evaluate the checkpoint; 0 when done (ranks > 0: once the weights are exported)."""
    from archer_mcore.parallel.distributed import single_process_rendezvous

    cfg, step_dir, recipe = _checked_inputs(args)  # before the tokenizer and the model load
    single_process_rendezvous()
    prompts, tokenizer, engine = _policy_in_engine(cfg, step_dir, args.data)
    if engine is None:
        return 0
    _evaluate(
        cfg,
        args,
        step_dir=step_dir,
        prompts=prompts,
        tokenizer=tokenizer,
        engine=engine,
        recipe=recipe,
    )
    engine.shutdown()
    return 0


def _checked_inputs(args: argparse.Namespace) -> tuple[Config, Path, Any]:
    """The config (with the recipe's settings, then --samples), the verified step
    directory to evaluate and the recipe (None without --recipe); a ConfigError naming
    the flag for a bad config, recipe, model path, data file or checkpoint."""
    from archer_mcore.train.eval_recipes import apply_recipe, load_recipe
    from archer_mcore.train.preflight import check_data_files, check_model_path

    cfg = load_config(args.config, args.override)
    recipe = None
    if args.recipe is not None:
        recipe = load_recipe(args.recipe)
        apply_recipe(cfg, recipe, args.override)
    if args.chunk_prompts is not None and args.chunk_prompts < 0:
        raise ConfigError(f"--chunk-prompts must be >= 0, got {args.chunk_prompts}")
    if args.samples is not None:
        if args.samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {args.samples}")
        cfg.eval.n_samples = args.samples
    check_model_path(cfg)
    check_data_files(args.data, "--data")
    return cfg, checkpoint_step_dir(args.checkpoint), recipe


def _policy_in_engine(
    cfg: Config, step_dir: Path, data_files: list[str]
) -> tuple[list[Any], Any, Any]:
    """(prompts, tokenizer, engine): the prompts of `data_files` with their rewards
    routed, and on rank 0 a rollout engine holding the checkpoint's weights (None on
    the other ranks, which only take part in the weight export)."""
    from archer_mcore.data.prepare import build_tokenizer, route_rewards
    from archer_mcore.data.prompt_dataset import PromptDataset
    from archer_mcore.parallel.ranks import rank
    from archer_mcore.train.components import build_engine

    tokenizer = build_tokenizer(cfg, Path(cfg.warmstart.cache_dir))
    data = PromptDataset.from_files(data_files, tokenizer, cfg.data.max_prompt_length)
    if len(data) == 0:
        raise ConfigError(f"--data: no usable prompt in {data_files}: {data.report.summary()}")
    data = route_rewards(cfg, data, "--data")
    policy, hf_config = policy_from_checkpoint(cfg, step_dir, tokenizer)
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
    *,
    step_dir: Path,
    prompts: list[Any],
    tokenizer: Any,
    engine: Any,
    recipe: Any = None,
) -> None:
    """Sample and score `eval.n_samples` responses per prompt; write the JSON (--out, else
    <output_dir>/eval/eval.json) and the markdown table beside it (.md), and print the
    table with each source's reward faults."""
    from archer_mcore.rewards.scorer import RewardScorer
    from archer_mcore.train.eval_metrics import EVAL_PASS_KS, format_table, summarize
    from archer_mcore.train.sampling import eval_sampling_params
    from archer_mcore.train.scoring import score_groups

    e = cfg.eval
    params = eval_sampling_params(cfg)
    if recipe is not None:
        _check_data_source(recipe, prompts)
    print(f"eval: {len(prompts)} prompts x {e.n_samples} samples from {step_dir}", file=sys.stderr)
    chunk = args.chunk_prompts if args.chunk_prompts is not None else 0
    if args.chunk_prompts is None and recipe is not None:
        chunk = recipe.chunk_prompts
    batch = _generate_with_progress(engine, prompts, n=e.n_samples, params=params, chunk=chunk)
    with RewardScorer.from_config(cfg.rewards) as scorer:
        recorder = _RecordingScorer(scorer)
        groups = score_groups(recorder, tokenizer, prompts, batch)
    records = [(g.data_source, [c > 0 for c in g.correct]) for g in groups]
    summary = summarize(records, extra_ks=EVAL_PASS_KS)  # as the loop's periodic eval
    failures = _failures_by_source(groups, recorder.results)
    settings = {
        "n_samples": e.n_samples,
        "temperature": e.temperature,
        "top_p": e.top_p,
        "max_new_tokens": e.max_new_tokens,
        "max_prompt_length": cfg.data.max_prompt_length,
        "seed": params.seed,
    }
    result: dict[str, Any] = {
        "checkpoint": str(step_dir),
        "settings": settings,
        "results": summary,
        "reward_failures": failures,
        "lengths": _lengths(groups),
    }
    if recipe is not None:
        result["recipe"] = {**recipe.settings(), "file": recipe.source}
        result["reported"] = _reported(recipe, summary, e.n_samples)
    out = _write_result(cfg, args.out, json.dumps(result, indent=2) + "\n")
    # The reward-failure count beside each accuracy: a response the reward could not
    # score (timeout, crash, no reward for its source) counts as wrong.
    table = {src: {**row, "reward_failures": failures.get(src, 0)} for src, row in summary.items()}
    text = format_table(table)
    md = out.with_suffix(".md") if out.suffix != ".md" else out.with_name(out.name + ".md")
    lengths = result["lengths"]["all"]
    text_md = text + (
        f"\n\nResponses: {lengths['mean_response_tokens']:.0f} tokens on average, at most "
        f"{lengths['max_response_tokens']:.0f}; {100 * lengths['truncated_fraction']:.1f}% "
        "cut at max_new_tokens."
    )
    report = _markdown(
        step_dir, settings, recipe=recipe, reported=result.get("reported"), table=text_md
    )
    _write_markdown(md, report)
    print(text)
    if failures.get("all"):
        print(
            f"eval: {failures['all']} responses could not be scored (reward faults) and "
            "count as wrong",
            file=sys.stderr,
        )
    print(f"written: {out}", file=sys.stderr)
    print(f"written: {md}", file=sys.stderr)


def _lengths(groups: list[Any]) -> dict[str, dict[str, float]]:
    """Per data source (and "all"): mean and max response length in tokens and the
    fraction of responses cut at max_new_tokens (finish reason "length"): a high
    fraction means the response limit, not the model, decided those answers."""
    by_source: dict[str, list[Any]] = {}
    for g in groups:
        by_source.setdefault(g.data_source, []).extend(g.samples)
        by_source.setdefault("all", []).extend(g.samples)
    out: dict[str, dict[str, float]] = {}
    for source, samples in by_source.items():
        n = [len(s.token_ids) for s in samples]
        out[source] = {
            "mean_response_tokens": sum(n) / len(n),
            "max_response_tokens": float(max(n)),
            "truncated_fraction": sum(s.finish_reason == "length" for s in samples) / len(n),
        }
    return out


def _check_data_source(recipe: Any, prompts: list[Any]) -> None:
    """A warning on stderr when no prompt carries the recipe's data_source (a file
    prepared for another benchmark, or under another name): the numbers are still
    computed per source, but are not the recipe's benchmark."""
    if not recipe.data_source:
        return
    sources = sorted({p.data_source for p in prompts})
    if recipe.data_source not in sources:
        print(
            f"eval: warning: recipe {recipe.name} expects data_source "
            f"{recipe.data_source!r} (e.g. {recipe.data_file or 'its prepared file'}), "
            f"the data has {sources}",
            file=sys.stderr,
        )


def _generate_with_progress(
    engine: Any, prompts: list[Any], *, n: int, params: Any, chunk: int
) -> Any:
    """engine.generate over `prompts`, `chunk` prompts per call (0: one call), with a
    progress line on stderr after each call (prompts done, elapsed, time left)."""
    import time

    from archer_mcore.rollout.types import RolloutBatch

    ids = [p.prompt_ids for p in prompts]
    if chunk <= 0 or chunk >= len(ids):
        return engine.generate(ids, n, params)
    start = time.monotonic()
    groups: list[Any] = []
    for i in range(0, len(ids), chunk):
        groups.extend(engine.generate(ids[i : i + chunk], n, params).groups)
        done, elapsed = len(groups), time.monotonic() - start
        left = elapsed / done * (len(ids) - done)
        print(
            f"eval: {done}/{len(ids)} prompts ({100 * done / len(ids):.0f}%), "
            f"{elapsed:.1f}s elapsed, ~{left:.0f}s left",
            file=sys.stderr,
            flush=True,
        )
    return RolloutBatch(groups=groups)


def _reported(recipe: Any, summary: dict[str, dict[str, float]], k: int) -> dict[str, Any]:
    """The metrics the recipe's paper reports, on the recipe's data source (else "all"),
    at the k actually sampled: {"source", "<metric>@k": value}."""
    source = recipe.data_source if recipe.data_source in summary else "all"
    row = summary[source]
    return {"source": source, **{m: row[m] for m in recipe.metric_names(k) if m in row}}


def _markdown(
    step_dir: Path,
    settings: dict[str, Any],
    *,
    recipe: Any,
    reported: dict[str, Any] | None,
    table: str,
) -> str:
    """The markdown report: what was evaluated, with which settings, and the table."""
    title = f"Evaluation: {recipe.name}" if recipe is not None else "Evaluation"
    lines = [f"# {title}", "", f"- checkpoint: `{step_dir}`"]
    if recipe is not None:
        lines.append(f"- recipe: `{recipe.source}` ({recipe.description})")
    lines.append("- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if reported:
        cells = [k for k in reported if k != "source"]
        lines += [
            "",
            f"Reported metrics (source `{reported['source']}`):",
            "",
            "| " + " | ".join(cells) + " |",
            "|" + "---|" * len(cells),
            "| " + " | ".join(f"{100 * reported[c]:.1f}" for c in cells) + " |",
        ]
    lines += ["", "All metrics per data source (fractions):", "", table, ""]
    return "\n".join(lines)


def _write_markdown(path: Path, text: str) -> None:
    """Write the markdown report atomically (never through a link)."""
    from archer_mcore.utils.safe_files import UnsafePathError, write_atomic

    try:
        write_atomic(path, text, durable=False)
    except UnsafePathError as exc:
        raise ConfigError(f"--out: {exc}") from None


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
