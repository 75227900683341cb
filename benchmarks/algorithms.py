#!/usr/bin/env python
"""Compare GRPO, DAPO, Archer and forking-token RL on the CPU demo task: the four
algorithms, one-factor ablations, and a collapse-prone regime, with intervals over seeds.

Design (what is shared, what varies):
- One warm start for every run. The config's `train.seed` fixes the synthetic data
  (train and held-out problems) and the supervised warm start; both are made once
  (the warm start by a real `archer train -o train.steps=0`, cached), then every RL run
  starts from that model (`model.path`) on those files (`data.train_files` /
  `data.eval_files`), so the step-0 baseline is the same policy for all runs.
- The seed of a run (`train.seed=SEED`) varies only the RL part: the sampler's prompt
  order, the rollout sampling stream, the update's mini-batch order and the eval
  sampling stream. Every variant runs the same seeds, so differences between variants
  are paired by seed.
- A variant is a list of config overrides (`-o KEY=VALUE` of `archer train`); its runs'
  `command.txt` is the exact command. Sections (run in this order, each reported as soon
  as its runs finish):
  * `algorithms`: grpo, dapo, archer, forking (their presets);
  * `ablations`: one factor at a time from the archer preset (aggregation token-mean;
    KL 0; knowledge clip = reasoning clip; reasoning clip = knowledge clip; no group
    filter) and from grpo (seq-mean-token-mean);
  * `collapse`: grpo, dapo, forking, archer under `--regime` overrides (default: more
    PPO epochs per batch and a higher learning rate), a setting prone to entropy collapse.
  Runs shared by sections (the archer and grpo references) are trained once.
- Equal budget: the same RL steps, prompts per step, samples per prompt, epochs and
  optimizer within a section. DAPO and forking refill filtered groups with extra
  generation batches (dynamic sampling), so they may generate more samples per step;
  the table reports generated samples per run.

Statistics: per variant, the mean over seeds with a two-sided 95% Student-t interval
(mean +- t_{0.975, n-1} s / sqrt(n), s the sample std over seeds); differences between
variants are paired by seed (the interval of the per-seed differences). Held-out metrics
come from the trainer's eval files (`eval/step_*.json`): avg@n and the unbiased pass@k
(Chen et al. 2021) for k = 1, 4, 16 from n = eval.n_samples samples per problem. With n
samples the unbiased estimate of avg@k is avg@n for every k <= n (the mean over k-subsets
of a subset's mean is the overall mean), and pass@1 equals it too.

Each run is one `archer train` subprocess (torch threads 1) with its own output
directory. Outputs in --out-dir: `<section>.png`, `table_<section>.md`,
`summary_<section>.json`, `runs/<variant>_s<seed>/` and a section per benchmark section
in --results-md (text from `<out-dir>/notes/<section>.md` is appended to it when present).

Usage:
    python benchmarks/algorithms.py --seeds 1234 1235 1236 1237 1238 --steps 30 --jobs 2
    python benchmarks/algorithms.py --sections ablations --report-only ...
    python benchmarks/algorithms.py --smoke --out-dir /tmp/algo_smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archer_mcore.metrics.keys import WALL_CLOCK_PREFIXES

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Algorithm comparison (CPU demo task)"
HEADINGS = {
    "algorithms": SECTION,
    "ablations": "## Archer ablations: which factor moves the result (CPU demo task)",
    "collapse": "## A collapse-prone regime: entropy and pass@k (CPU demo task)",
}
ALGORITHMS = ("grpo", "dapo", "archer", "forking")
#: pass@k reported (those <= eval.n_samples)
PASS_KS = (1, 4, 16)
#: the collapse-prone regime's default overrides (--regime replaces them)
REGIME = ("train.ppo_epochs=2", "optimizer.lr=6e-4")
#: token groups (other than `all`) each token rule reports (`entropy/<group>`, `clip/*/<group>`)
RULE_GROUPS = {"none": (), "archer": ("knowledge", "reasoning"), "forking": ("forking", "other")}


def plotted_metric_keys(n_eval: int) -> list[str]:
    """The trainer metric keys behind every curve the figures draw: avg@n is
    `eval/accuracy`, pass@k is `eval/pass@<k>` (the eval files hold the same numbers),
    entropy and clip fractions per token group come from metrics.jsonl."""
    groups = ("all", *(g for gs in RULE_GROUPS.values() for g in gs))
    keys = ["eval/accuracy", *(f"eval/pass@{k}" for k in PASS_KS if k <= n_eval)]
    keys += [f"entropy/{g}" for g in groups]
    keys += [f"clip/{bound}/{g}" for bound in ("low", "high") for g in groups]
    return keys


#: a tiny budget for `--smoke` (the test runs it on 2 shared cores)
SMOKE_OVERRIDES = (
    "data.synthetic_train_size=128",
    "data.synthetic_eval_size=6",
    "data.synthetic.min_operands=2",
    "data.synthetic.max_operands=2",
    "warmstart.steps=30",
    "warmstart.examples=64",
    "warmstart.batch_size=16",
    # megatron's distributed optimizer cannot checkpoint before its first step (an
    # assertion in DistributedOptimizer.state_dict), which a 2-step run whose groups
    # are all filtered out would hit; the plain optimizer can.
    "parallel.use_distributed_optimizer=false",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_new_tokens=16",
    "eval.every=1",
    "eval.n_samples=4",
    "eval.max_new_tokens=16",
    "algorithm.max_generation_batches=2",
    # the tiny warm start solves nothing: keep all-wrong groups so every variant updates
    # (and logs its entropy and clip fractions); the filters are not what smoke checks
    "algorithm.group_filter=none",
)
#: --smoke: an algorithm, an ablation (with its reference) and the regime, 2 seeds
SMOKE_VARIANTS = ("grpo", "grpo-seqmean", "archer-hot")
SMOKE_REGIME = ("train.ppo_epochs=2", "optimizer.lr=3e-4")


@dataclass(frozen=True)
class Variant:
    """A named list of `archer train` overrides; `reference` names the variant it is
    compared with, paired by seed (an ablation's preset, the regime's default run)."""

    name: str
    overrides: tuple[str, ...]
    what: str
    reference: str | None = None

    @property
    def algorithm(self) -> str:
        names = [o.split("=", 1)[1] for o in self.overrides if o.startswith("algorithm.name=")]
        return names[-1] if names else "archer"


def build_sections(regime: Sequence[str]) -> dict[str, list[Variant]]:
    """The variants of each section, in report order."""
    algos = [Variant(a, (f"algorithm.name={a}",), f"the {a} preset") for a in ALGORITHMS]
    by = {v.name: v for v in algos}
    archer = ("algorithm.name=archer",)
    ablations = [
        by["archer"],
        Variant(
            "archer-tokmean",
            (*archer, "algorithm.agg_mode=token-mean"),
            "archer, aggregation token-mean",
            "archer",
        ),
        Variant("archer-kl0", (*archer, "algorithm.kl_coef=0"), "archer, KL 0", "archer"),
        Variant(
            "archer-kclip",
            (*archer, "algorithm.clip_low=0.5", "algorithm.clip_high=0.5"),
            "archer, knowledge clip = reasoning clip (0.5)",
            "archer",
        ),
        Variant(
            "archer-rclip",
            (
                *archer,
                "algorithm.token_rule.reasoning_clip_low=0.2",
                "algorithm.token_rule.reasoning_clip_high=0.2",
            ),
            "archer, reasoning clip = knowledge clip (0.2): no dual-token clip",
            "archer",
        ),
        Variant(
            "archer-nofilter",
            (*archer, "algorithm.group_filter=none"),
            "archer, no group filter (all-correct / all-wrong groups kept, as grpo)",
            "archer",
        ),
        by["grpo"],
        Variant(
            "grpo-seqmean",
            ("algorithm.name=grpo", "algorithm.agg_mode=seq-mean-token-mean"),
            "grpo, aggregation seq-mean-token-mean",
            "grpo",
        ),
    ]
    collapse = [
        Variant(
            f"{a}-hot", (f"algorithm.name={a}", *regime), f"{a} in the regime {' '.join(regime)}", a
        )
        for a in ("grpo", "dapo", "forking", "archer")
    ]
    return {"algorithms": algos, "ablations": ablations, "collapse": collapse}


@dataclass
class RunResult:
    variant: str
    seed: int
    output_dir: str
    returncode: int
    wall_s: float
    rows: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.rows)


# ----------------------------------------------------------------------------- runs
def archer_command(config: str, overrides: Sequence[str]) -> list[str]:
    cmd = [sys.executable, "-m", "archer_mcore.cli", "train", config]
    for o in overrides:
        cmd += ["-o", o]
    return cmd


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def prepare_shared_start(
    config: str, overrides: Sequence[str], shared: Path, cache: Path, log_path: Path
) -> list[str]:
    """Make the data and the warm start once; return the overrides that reuse them.

    The paths are computed with the trainer's own functions (data/prepare.py), the warm
    start itself is trained by a real `archer train` with zero RL steps; if the model
    directory it should have written is missing, the key computation here has drifted
    from the trainer's and this raises.
    """
    from archer_mcore.config import load_config
    from archer_mcore.data.prepare import build_tokenizer, data_files, warmstart_examples
    from archer_mcore.data.prompt_dataset import PromptDataset
    from archer_mcore.train.components import hf_config_dict
    from archer_mcore.train.warmstart import cache_key

    shared.mkdir(parents=True, exist_ok=True)
    base = [*overrides, f"warmstart.cache_dir={cache}", "metrics.enabled=false"]
    cfg = load_config(config, base)
    tokenizer = build_tokenizer(cfg, cache)
    train_files, eval_files = data_files(cfg, cache)
    reuse = [
        f"data.eval_files={json.dumps(eval_files)}",
        "warmstart.steps=0",
    ]
    if not cfg.model.tokenizer and not cfg.model.path:
        reuse.append(f"model.tokenizer={cache / 'tokenizer'}")
    if cfg.warmstart.steps == 0:
        return [*reuse, f"data.train_files={json.dumps(train_files)}"]

    w = cfg.warmstart
    train_data = PromptDataset.from_files(train_files, tokenizer, cfg.data.max_prompt_length)
    examples = warmstart_examples(
        train_data, tokenizer, count=w.examples, noise=w.noise, seed=cfg.train.seed
    )
    key = cache_key(
        hf_config_dict(cfg, tokenizer),
        examples,
        steps=w.steps,
        batch_size=w.batch_size,
        lr=w.lr,
        seed=cfg.train.seed,
    )
    model_dir = cache / key
    if not (model_dir / "DONE").exists():
        print(f"warm start: training {model_dir} ({w.steps} steps)", flush=True)
        cmd = archer_command(
            config,
            [
                *base,
                "train.steps=0",
                "eval.every=0",
                "train.torch_threads=1",
                f"train.output_dir={shared / 'warmstart_run'}",
            ],
        )
        with open(log_path, "w") as log:
            rc = subprocess.call(
                cmd, cwd=shared, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
            )
        if rc != 0:
            raise RuntimeError(f"warm start failed (exit {rc}); see {log_path}")
    if not (model_dir / "DONE").exists():
        raise RuntimeError(
            f"warm start: expected the trainer to write {model_dir}; the cache key computed "
            "here no longer matches components.build_components"
        )
    # RL skips the prompts the warm start imitated, as build_components does.
    offset = w.examples if w.examples < len(train_data) else 0
    rl_train = shared / "rl_train.jsonl"
    lines = [ln for f in train_files for ln in Path(f).read_text().splitlines() if ln.strip()]
    if len(lines) != len(train_data):
        raise RuntimeError(
            f"{train_files}: {len(lines)} lines but {len(train_data)} usable prompts; "
            "cannot reproduce the trainer's warm-start offset"
        )
    rl_train.write_text("\n".join(lines[offset:]) + "\n")
    return [*reuse, f"model.path={model_dir}", f"data.train_files={json.dumps([str(rl_train)])}"]


def read_metrics(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics.jsonl (unparseable lines are skipped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def run_command(
    config: str, variant: Variant, seed: int, overrides: Sequence[str], run_dir: Path
) -> list[str]:
    """The `archer train` command of one run."""
    return archer_command(
        config,
        [
            *overrides,
            *variant.overrides,
            f"train.seed={seed}",
            f"train.output_dir={run_dir}",
            f"train.run_name=bench_{variant.name}_s{seed}",
            "train.torch_threads=1",
            "metrics.enabled=false",
        ],
    )


def reusable_run(
    config: str, variant: Variant, seed: int, overrides: Sequence[str], run_dir: Path
) -> RunResult | None:
    """A finished, successful run on disk made by exactly this command (--reuse), or None."""
    cmd = shlex.join(run_command(config, variant, seed, overrides, run_dir)) + "\n"
    command = run_dir / "command.txt"
    if not command.exists() or command.read_text() != cmd:
        return None
    r = finished_run(variant.name, seed, run_dir)
    return r if r is not None and r.ok else None


def run_one(
    config: str, variant: Variant, seed: int, overrides: Sequence[str], run_dir: Path
) -> RunResult:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: start clean
    run_dir.mkdir(parents=True)
    cmd = run_command(config, variant, seed, overrides, run_dir)
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    start = time.perf_counter()
    # cwd is the run directory, not the repository: `python -m` puts its cwd first on
    # sys.path, which would shadow a code snapshot given in PYTHONPATH.
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.call(
            cmd, cwd=run_dir, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
        )
    wall = time.perf_counter() - start
    (run_dir / "result.json").write_text(json.dumps({"returncode": rc, "wall_s": wall}) + "\n")
    rows = read_metrics(run_dir / "metrics.jsonl")
    status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {run_dir / 'train.log'})"
    print(f"{variant.name:15s} seed {seed}: {len(rows)} steps, {wall:.0f}s, {status}", flush=True)
    return RunResult(variant.name, seed, str(run_dir), rc, wall, rows)


def finished_run(variant: str, seed: int, run_dir: Path) -> RunResult | None:
    """A run already on disk (for --report-only / reuse), or None."""
    meta = run_dir / "result.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return RunResult(
        variant,
        seed,
        str(run_dir),
        int(info["returncode"]),
        float(info["wall_s"]),
        read_metrics(run_dir / "metrics.jsonl"),
    )


#: metrics that measure the machine, not the run (differ between identical reruns)
TIMING_PREFIXES = WALL_CLOCK_PREFIXES
TIMING_KEYS = ("throughput/train_tokens", "throughput/rollout_tokens")


def reproducibility_diff(a: Path, b: Path) -> list[str]:
    """Keys (`step N: key a != b`) on which two runs' metrics.jsonl and eval files differ,
    ignoring wall-clock timings (`time/*`, `throughput/*_per_s`, `overlap/*`); [] when
    identical."""
    diffs = []
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    if len(ra) != len(rb):
        diffs.append(f"{len(ra)} vs {len(rb)} steps")
    for x, y in zip(ra, rb):
        keys = {k for k in set(x) | set(y) if not k.startswith(TIMING_PREFIXES) or k in TIMING_KEYS}
        for k in sorted(keys):
            if x.get(k) != y.get(k):
                diffs.append(f"step {x.get('step')}: {k} {x.get(k)!r} != {y.get(k)!r}")
    ea = sorted(p.name for p in (a / "eval").glob("step_*.json"))
    eb = sorted(p.name for p in (b / "eval").glob("step_*.json"))
    if ea != eb:
        diffs.append(f"eval files {ea} vs {eb}")
    for name in set(ea) & set(eb):
        if (a / "eval" / name).read_text() != (b / "eval" / name).read_text():
            diffs.append(f"eval/{name} differs")
    return diffs


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width, n): the two-sided Student-t interval mean +- t_{(1+c)/2, n-1}
    s / sqrt(n) over the finite values (s the sample std); half-width NaN for n < 2."""
    from scipy.stats import t as student_t

    vals = [v for v in values if v is not None and math.isfinite(v)]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    m = statistics.fmean(vals)
    if n < 2:
        return m, math.nan, 1
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * statistics.stdev(vals) / math.sqrt(n)
    return m, half, n


def paired_interval(
    a: dict[int, float], b: dict[int, float], confidence: float = 0.95
) -> tuple[float, float, int]:
    """t_interval of a[seed] - b[seed] over the seeds both have."""
    return t_interval([a[s] - b[s] for s in sorted(set(a) & set(b))], confidence)


def eval_curve(run: RunResult, metric: str) -> dict[int, float]:
    """step -> `metric` (e.g. "avg@16", "pass@4") of the held-out set, from the run's
    eval/step_*.json (step 0 = the warm start)."""
    curve = {}
    for path in sorted((Path(run.output_dir) / "eval").glob("step_*.json")):
        row = json.loads(path.read_text()).get("all", {})
        if metric in row:
            curve[int(path.stem.removeprefix("step_"))] = float(row[metric])
    return curve


def metric_curve(run: RunResult, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in run.rows if key in r}


def clip_curve(run: RunResult, group: str) -> dict[int, float]:
    """step -> share of the group's tokens clipped at the low or high bound."""
    lo, hi = metric_curve(run, f"clip/low/{group}"), metric_curve(run, f"clip/high/{group}")
    return {s: lo[s] + hi[s] for s in sorted(set(lo) & set(hi))}


def tail_mean(curve: dict[int, float], k: int = 5) -> float:
    """Mean of the last `k` values (the end of the run, smoothed over steps)."""
    vals = [curve[s] for s in sorted(curve)][-k:]
    return statistics.fmean(vals) if vals else math.nan


def head_mean(curve: dict[int, float], k: int = 3) -> float:
    """Mean of the first `k` values."""
    vals = [curve[s] for s in sorted(curve)][:k]
    return statistics.fmean(vals) if vals else math.nan


def generated_samples(run: RunResult, prompts_per_step: int, n: int) -> int:
    """Responses generated for training (every generation batch has prompts_per_step x n)."""
    return (
        int(sum(r.get("sampling/generation_batches", 0.0) for r in run.rows)) * prompts_per_step * n
    )


def groups_of(variant: Variant, cfg_for: Any) -> tuple[str, ...]:
    """`all` and the token groups of the variant's token rule."""
    return ("all", *RULE_GROUPS.get(cfg_for(variant).algorithm.token_rule.name, ()))


def per_seed(runs: Sequence[RunResult], fn: Any) -> dict[int, float]:
    """seed -> fn(run) over the runs (NaN-valued seeds dropped)."""
    out = {}
    for r in runs:
        v = fn(r)
        if v is not None and math.isfinite(v):
            out[r.seed] = float(v)
    return out


def last(curve: dict[int, float]) -> float:
    return curve[max(curve)] if curve else math.nan


def run_measures(
    run: RunResult, n_eval: int, groups: Sequence[str], pps: int, n: int
) -> dict[str, float]:
    """One run's numbers for the table: held-out metrics at the last eval, the gain over
    step 0, entropy and clip fraction per token group (first 3 / last 5 updates)."""
    avg = eval_curve(run, f"avg@{n_eval}")
    out = {
        f"avg@{n_eval}": last(avg),
        "gain": last(avg) - avg.get(0, math.nan) if avg else math.nan,
        "train_acc_end": tail_mean(metric_curve(run, "reward/accuracy")),
        "samples": float(generated_samples(run, pps, n)),
        "wall_s": run.wall_s,
    }
    for k in PASS_KS:
        if k <= n_eval:
            out[f"pass@{k}"] = last(eval_curve(run, f"pass@{k}"))
    for g in groups:
        ent = metric_curve(run, f"entropy/{g}")
        out[f"entropy_start/{g}"] = head_mean(ent)
        out[f"entropy_end/{g}"] = tail_mean(ent)
        out[f"clip_end/{g}"] = tail_mean(clip_curve(run, g))
    return out


def summarise(
    runs: Sequence[RunResult],
    variants: Sequence[Variant],
    cfg_for: Any,
    references: Sequence[Variant] = (),
) -> list[dict[str, Any]]:
    """Per variant: each measure's per-seed values and t-interval, and for variants with
    a reference the paired difference to it; `references` are measured for those
    differences only (no row of their own)."""
    measures: dict[str, dict[str, dict[int, float]]] = {}
    rows = []
    for v in [*variants, *references]:
        cfg = cfg_for(v)
        rs = [r for r in runs if r.variant == v.name and r.ok]
        per_run = {
            r.seed: run_measures(
                r,
                cfg.eval.n_samples,
                groups_of(v, cfg_for),
                cfg.train.prompts_per_step,
                cfg.rollout.n_samples_per_prompt,
            )
            for r in rs
        }
        keys = sorted({k for m in per_run.values() for k in m})
        by_key = {
            k: {s: m[k] for s, m in per_run.items() if k in m and math.isfinite(m[k])} for k in keys
        }
        measures[v.name] = by_key
        if v in references and v not in variants:
            continue
        rows.append(
            {
                "variant": v.name,
                "what": v.what,
                "overrides": list(v.overrides),
                "reference": v.reference,
                "seeds_ok": len(rs),
                "seeds_failed": sum(1 for r in runs if r.variant == v.name and not r.ok),
                "per_seed": by_key,
                "interval": {k: t_interval(list(vals.values())) for k, vals in by_key.items()},
            }
        )
    for row in rows:
        ref = row["reference"]
        if ref and ref in measures:
            row["vs_reference"] = {
                k: paired_interval(row["per_seed"][k], measures[ref][k])
                for k in row["per_seed"]
                if k in measures[ref]
            }
    return rows


def fmt(iv: Sequence[float], digits: int = 3, signed: bool = False) -> str:
    """'mean ± half' of a (mean, half, n) interval."""
    m, h = iv[0], iv[1]
    if m is None or math.isnan(m):
        return "n/a"
    head = f"{m:+.{digits}f}" if signed else f"{m:.{digits}f}"
    return head if math.isnan(h) else f"{head} ± {h:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], n_eval: int) -> str:
    ks = [k for k in PASS_KS if k <= n_eval and k != 1]
    head = ["variant", "seeds", f"avg@{n_eval} (= pass@1)"]
    head += [f"pass@{k}" for k in ks]
    head += [
        "gain vs step 0",
        "train acc (last 5 steps)",
        "entropy all: first 3 → last 5 updates",
        "entropy by group (last 5)",
        "clip fraction by group (last 5)",
        "generated samples",
        "wall (s)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        iv = row["interval"]
        none = (math.nan, math.nan, 0)
        groups = [k.split("/", 1)[1] for k in iv if k.startswith("entropy_end/")]
        sub = [g for g in groups if g != "all"]
        seeds = f"{row['seeds_ok']}" + (
            f" ({row['seeds_failed']} failed)" if row["seeds_failed"] else ""
        )
        cells = [f"`{row['variant']}`", seeds, fmt(iv.get(f"avg@{n_eval}", none))]
        cells += [fmt(iv.get(f"pass@{k}", none)) for k in ks]
        cells += [
            fmt(iv.get("gain", none), signed=True),
            fmt(iv.get("train_acc_end", none)),
            f"{fmt(iv.get('entropy_start/all', none))} → {fmt(iv.get('entropy_end/all', none))}",
            ", ".join(f"{g} {fmt(iv[f'entropy_end/{g}'])}" for g in sub) or "–",
            ", ".join(
                f"{g} {fmt(iv[f'clip_end/{g}'], 4)}" for g in groups if f"clip_end/{g}" in iv
            ),
            fmt(iv.get("samples", none), 0),
            fmt(iv.get("wall_s", none), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def difference_table(rows: Sequence[dict[str, Any]], n_eval: int) -> str:
    """Paired (by seed) differences of each variant with a reference to that reference."""
    ks = [k for k in PASS_KS if k <= n_eval and k != 1]
    keys = [f"avg@{n_eval}", *(f"pass@{k}" for k in ks), "train_acc_end", "entropy_end/all"]
    names = {"train_acc_end": "train acc (last 5)", "entropy_end/all": "entropy all (last 5)"}
    head = ["variant − reference", "seeds", *(f"Δ {names.get(k, k)}" for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        diff = row.get("vs_reference")
        if not diff:
            continue
        n = max((d[2] for d in diff.values()), default=0)
        cells = [f"`{row['variant']}` − `{row['reference']}`", str(n)]
        cells += [fmt(diff.get(k, (math.nan, math.nan, 0)), signed=True) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


# ----------------------------------------------------------------------------- plot
def _band(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every curve, with mean and sample std over curves."""
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_std([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def _band_ci(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every curve, with mean and 95% t half-width over curves (0 for
    a single curve)."""
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    ivs = [t_interval([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _, _ in ivs], [0.0 if math.isnan(h) else h for _, h, _ in ivs]


def plot(
    runs: Sequence[RunResult],
    variants: Sequence[Variant],
    cfg_for: Any,
    n_eval: int,
    path: Path,
    title: str,
) -> None:
    """Held-out avg@n, pass@4, pass@16 over training (mean and 95% t band over seeds);
    entropy of all tokens, entropy per token group and clip fraction per group per step
    (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {v.name: palette[i % len(palette)] for i, v in enumerate(variants)}
    styles = {"all": "-", "knowledge": "--", "reasoning": ":", "forking": ":", "other": "--"}
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    ks = [k for k in PASS_KS if 1 < k <= n_eval]
    eval_panels = [(axes[0][0], f"avg@{n_eval}")] + [
        (axes[0][i + 1], f"pass@{k}") for i, k in enumerate(ks[:2])
    ]
    for v in variants:
        rs = [r for r in runs if r.variant == v.name and r.ok]
        if not rs:
            continue
        c = colors[v.name]
        for ax, metric in eval_panels:
            steps, mean, half = _band_ci([eval_curve(r, metric) for r in rs])
            if steps:
                ax.plot(steps, mean, marker="o", color=c, label=f"{v.name} (n={len(rs)})")
                ax.fill_between(
                    steps,
                    [m - h for m, h in zip(mean, half)],
                    [m + h for m, h in zip(mean, half)],
                    color=c,
                    alpha=0.12,
                )
        steps, mean, _ = _band([metric_curve(r, "entropy/all") for r in rs])
        if steps:
            axes[1][0].plot(steps, mean, color=c, marker=".", ms=3, label=v.name)
        for g in groups_of(v, cfg_for)[1:]:
            steps, mean, _ = _band([metric_curve(r, f"entropy/{g}") for r in rs])
            if steps:
                axes[1][1].plot(
                    steps,
                    mean,
                    styles.get(g, "-"),
                    color=c,
                    marker=".",
                    ms=3,
                    label=f"{v.name}: {g}",
                )
        for g in groups_of(v, cfg_for):
            steps, mean, _ = _band([clip_curve(r, g) for r in rs])
            if steps:
                axes[1][2].plot(
                    steps, mean, styles.get(g, "-"), color=c, lw=1, label=f"{v.name}: {g}"
                )
    for ax, metric in eval_panels:
        ax.set(xlabel="RL step", ylabel=metric, title=f"held-out {metric}, mean ± 95% t interval")
    axes[1][0].set(
        xlabel="RL step", ylabel="nats", yscale="log", title="entropy/all (mean over seeds)"
    )
    axes[1][1].set(
        xlabel="RL step",
        ylabel="nats",
        yscale="log",
        title="entropy per token group (knowledge/reasoning, forking/other)",
    )
    axes[1][2].set(
        xlabel="RL step",
        ylabel="share of tokens",
        title="clip fraction per group (clip/low + clip/high)",
    )
    for row in axes:
        for ax in row:
            ax.grid(alpha=0.3, which="both")
            if ax.has_data():
                ax.legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- report
def code_line() -> str:
    """Which archer_mcore the runs import: a snapshot given in PYTHONPATH (its COMMIT
    file names the commit it was exported from), or the checkout itself."""
    import archer_mcore

    where = Path(archer_mcore.__file__).resolve().parent.parent
    if where != REPO:
        commit = where / "COMMIT"
        tag = commit.read_text().strip()[:12] if commit.exists() else "unknown commit"
        return f"a snapshot of commit {tag} (`git archive`, imported via PYTHONPATH)"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = "unknown"
    return f"the working tree at HEAD {head} (uncommitted changes included)"


def machine_line() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{os.cpu_count()} cores (`nproc`), {model}, {now}"


def replace_section(text: str, section: str, heading: str = SECTION) -> str:
    """`text` with the `heading` block (up to the next '## ' heading) replaced by
    `section`, or `section` appended when the heading is absent."""
    lines = text.splitlines()
    if heading not in lines:
        body = text.rstrip("\n")
        return (body + "\n\n" if body else "# Benchmark results\n\n") + section.rstrip("\n") + "\n"
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
    return "\n".join(new + lines[end:]).rstrip("\n") + "\n"


def shown_command(argv: Sequence[str]) -> list[str]:
    """The benchmark's arguments as they produced the runs: without --report-only and
    --reuse (neither changes a run)."""
    return [a for a in argv if a not in ("--report-only", "--reuse")]


def report_section(
    name: str,
    variants: Sequence[Variant],
    runs: Sequence[RunResult],
    cfg_for: Any,
    seeds: Sequence[int],
    out: Path,
    results_md: Path,
    command: str,
    config_name: str,
    wall_s: float,
    repro: str,
    base: Any,
    heading: str,
    code: str,
    references: Sequence[Variant] = (),
    machine: str = "",
) -> str:
    """Write `<section>.png`, `table_<section>.md`, `summary_<section>.json` and the
    section in `results_md`; return the markdown table."""
    ran = {r.variant for r in runs}
    variants = [v for v in variants if v.name in ran]  # variants added since the runs: none
    cfg = base  # the shared settings; each variant's overrides are listed
    n_eval = cfg.eval.n_samples
    rows = summarise(runs, variants, cfg_for, references)
    png = out / f"{name}.png"
    t = cfg.train
    title = (
        f"{name}: {config_name}, {t.steps} RL steps x {t.prompts_per_step} prompts x "
        f"{cfg.rollout.n_samples_per_prompt} samples, seeds {list(seeds)}"
    )
    plot(runs, variants, cfg_for, n_eval, png, title)
    table = markdown_table(rows, n_eval)
    diffs = difference_table(rows, n_eval)
    (out / f"table_{name}.md").write_text(table + ("\n" + diffs if diffs else ""))
    (out / f"summary_{name}.json").write_text(
        json.dumps(
            {
                "section": name,
                "machine": machine or machine_line(),
                "code": code,
                "seeds": list(seeds),
                "wall_s": wall_s,
                "variants": rows,
                "runs": [
                    {
                        "variant": r.variant,
                        "seed": r.seed,
                        "dir": r.output_dir,
                        "returncode": r.returncode,
                        "wall_s": r.wall_s,
                    }
                    for r in runs
                    if r.variant in {v.name for v in variants}
                ],
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    rel = results_md.resolve().parent
    try:
        png_link = os.path.relpath(png, rel)
        out_link = os.path.relpath(out, rel)
    except ValueError:
        png_link, out_link = str(png), str(out)
    variant_lines = [
        f"- `{v.name}`: {v.what}; overrides `{' '.join('-o ' + o for o in v.overrides)}`"
        for v in variants
    ]
    notes = out / "notes" / f"{name}.md"
    e = cfg.eval
    section = "\n".join(
        [
            heading,
            "",
            f"**Current** (issue 18). Command: `{command}` (this section's runs: "
            f"{wall_s / 60:.1f} min of wall time).  ",
            f"Machine: {machine or machine_line()}.  ",
            f"Code: {code}.  ",
            f"Config: `{config_name}` (frozen copy `{out_link}/config.yaml`), {t.steps} RL steps x "
            f"{t.prompts_per_step} prompts x {cfg.rollout.n_samples_per_prompt} samples per "
            f"step, {t.ppo_epochs} PPO epoch(s), lr {cfg.optimizer.lr:g} (before each variant's "
            f"overrides, listed below); eval every {e.every} steps on "
            f"{cfg.data.synthetic_eval_size} held-out problems x {e.n_samples} samples at "
            f"T={e.temperature:g}. Seeds {list(seeds)} vary the RL run only (prompt order, "
            "sampling, mini-batch order); all runs start from one shared warm start (step 0). "
            f"Raw runs: `{out_link}/runs/<variant>_s<seed>/` (`command.txt` is each run's "
            "exact command).  ",
            f"Reproducibility: {repro}",
            "",
            "Variants:",
            *variant_lines,
            "",
            table,
            *(
                [
                    "Paired differences (per-seed difference to the reference, same seeds and "
                    "warm start; mean ± 95% t half-width over seeds):",
                    "",
                    diffs,
                ]
                if diffs
                else []
            ),
            f"![{name}: held-out avg@k, pass@k, entropy and clip fraction per group]({png_link})",
            "",
            f"Columns: held-out metrics at the last eval (step {t.steps}), mean ± 95% "
            "Student-t half-width over seeds (t_{0.975,n-1} s/√n). avg@n is the unbiased "
            "avg@k for every k ≤ n and equals pass@1; pass@k is the unbiased estimator "
            "1 − C(n−c,k)/C(n,k) per problem. Entropies are the mean per-token entropy of "
            "the trained responses (`entropy/<group>`), the first 3 and the last 5 updates; "
            "train acc is `reward/accuracy` (all generated training responses, fresh prompts) "
            "over the last 5 steps; "
            "the clip fraction is `clip/low/<group>` + `clip/high/<group>` over the last 5 "
            "updates; 'generated samples' counts every training response, refill batches "
            "included.",
            "",
            *([notes.read_text().rstrip("\n"), ""] if notes.exists() else []),
        ]
    )
    results_md.parent.mkdir(parents=True, exist_ok=True)
    old = results_md.read_text() if results_md.exists() else ""
    results_md.write_text(replace_section(old, section, heading))
    return table + ("\n" + diffs if diffs else "")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="RL seeds (default: the config's train.seed and the next four)",
    )
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: config)")
    p.add_argument(
        "--sections",
        nargs="+",
        default=list(HEADINGS),
        choices=list(HEADINGS),
        help="which sections to run and report, in this order",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="only these variants (by name) of the chosen sections",
    )
    p.add_argument(
        "--regime",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help=f"the collapse section's overrides (default: {' '.join(REGIME)})",
    )
    p.add_argument("--out-dir", default="benchmarks/results/algorithms/current")
    p.add_argument(
        "--results-md",
        default=None,
        help="markdown file whose sections are replaced "
        "(default benchmarks/RESULTS.md; with --smoke <out-dir>/RESULTS.md)",
    )
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every run (repeatable)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="warm-start cache shared by all runs (default <out-dir>/shared/cache)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="do not train: summarise the runs already under <out-dir>/runs",
    )
    p.add_argument(
        "--repro-check",
        action="store_true",
        help="rerun the first variant's first seed and compare its metrics and evals",
    )
    p.add_argument(
        "--heading-suffix",
        default="",
        help="appended to each section heading in --results-md (a second budget's sections)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep finished runs under <out-dir>/runs made by the same command",
    )
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (at most 2)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"2 steps, 2 seeds, tiny task, variants {' '.join(SMOKE_VARIANTS)}, repro check",
    )
    args = p.parse_args(argv)

    from archer_mcore.config import load_config

    overrides = list(SMOKE_OVERRIDES if args.smoke else ()) + list(args.override)
    if args.smoke:
        args.steps = 2
        args.variants = args.variants or list(SMOKE_VARIANTS)
        args.regime = args.regime or list(SMOKE_REGIME)
        args.repro_check = True
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    regime = tuple(args.regime or REGIME)
    out = Path(args.out_dir).resolve()
    frozen = out / "config.yaml"  # the copy the runs read (see below)
    # --report-only describes the runs: their frozen config, not today's file.
    source = frozen if args.report_only and frozen.exists() else Path(args.config)
    sections = {
        name: [v for v in vs if args.variants is None or v.name in args.variants]
        for name, vs in build_sections(regime).items()
        if name in args.sections
    }
    sections = {k: v for k, v in sections.items() if v}
    known = {v.name for vs in build_sections(regime).values() for v in vs}
    unknown = sorted(set(args.variants or ()) - known)
    if unknown or not sections:
        p.error(f"unknown variants {unknown}; known: {sorted(known)}" if unknown else "no variants")
    # Fail early on a bad key: every variant's config loads before any training.
    every = {v.name: v for vs in build_sections(regime).values() for v in vs}
    configs = {v.name: load_config(source, [*overrides, *v.overrides]) for v in every.values()}

    def cfg_for(v: Variant) -> Any:
        return configs[v.name]

    base = load_config(source, overrides)
    seeds = args.seeds or [base.train.seed + i for i in range(2 if args.smoke else 5)]
    out.mkdir(parents=True, exist_ok=True)
    results_md = Path(
        args.results_md or (out / "RESULTS.md" if args.smoke else REPO / "benchmarks/RESULTS.md")
    )
    if not args.report_only:
        # Every run reads one frozen copy: the config may be edited while the benchmark runs.
        shutil.copyfile(args.config, frozen)
    config = str(frozen)
    cache = Path(args.cache_dir).resolve() if args.cache_dir else out / "shared" / "cache"
    command = shlex.join(
        [
            "python",
            "benchmarks/algorithms.py",
            *shown_command(argv if argv is not None else sys.argv[1:]),
        ]
    )
    run_overrides = list(overrides)
    if not args.report_only:
        run_overrides += prepare_shared_start(
            config, overrides, out / "shared", cache, out / "warmstart.log"
        )
        (out / "overrides.json").write_text(json.dumps(run_overrides, indent=1) + "\n")

    code = code_line()  # at the start: later commits must not relabel the runs
    done: dict[tuple[str, int], RunResult] = {}
    all_ok = True
    first = next(iter(sections.values()))[0]
    repro_file = out / "reproducibility.json"
    for name, variants in sections.items():
        t0 = time.perf_counter()
        jobs = [(v, s) for s in seeds for v in variants if (v.name, s) not in done]
        if args.report_only:
            for v, s in jobs:
                r = finished_run(v.name, s, out / "runs" / f"{v.name}_s{s}")
                if r is not None:
                    done[(v.name, s)] = r
        else:
            if args.reuse:
                for v, s in jobs:
                    r = reusable_run(config, v, s, run_overrides, out / "runs" / f"{v.name}_s{s}")
                    if r is not None:
                        print(f"{v.name:15s} seed {s}: reusing {r.output_dir}", flush=True)
                        done[(v.name, s)] = r
                jobs = [(v, s) for v, s in jobs if (v.name, s) not in done]
            with ThreadPoolExecutor(max_workers=max(1, min(2, args.jobs))) as pool:
                for r in pool.map(
                    lambda job: run_one(
                        config,
                        job[0],
                        job[1],
                        run_overrides,
                        out / "runs" / f"{job[0].name}_s{job[1]}",
                    ),
                    jobs,
                ):
                    done[(r.variant, r.seed)] = r
        wall = time.perf_counter() - t0
        machine = machine_line()
        if args.report_only:
            prev = out / f"summary_{name}.json"
            if prev.exists():
                info = json.loads(prev.read_text())
                wall = float(info.get("wall_s", wall))
                machine = info.get("machine", machine)
                code = info.get("code", code)
        if args.repro_check and not args.report_only and name == next(iter(sections)):
            a = out / "runs" / f"{first.name}_s{seeds[0]}"
            b = out / "repro" / f"{first.name}_s{seeds[0]}"
            rerun = run_one(config, first, seeds[0], run_overrides, b)
            diff = (
                reproducibility_diff(a, b) if rerun.ok else [f"rerun failed ({rerun.returncode})"]
            )
            repro_file.write_text(
                json.dumps({"run": a.name, "rerun": str(b), "differences": diff}, indent=1) + "\n"
            )
        repro = "not checked in this run."
        if repro_file.exists():
            info = json.loads(repro_file.read_text())
            d = info["differences"]
            repro = (
                f"`{info['run']}` rerun from scratch (same warm start): metrics.jsonl and eval "
                "files identical "
                "(all keys but wall-clock timings `time/*`, `throughput/*_per_s`)."
                if not d
                else f"`{info['run']}` rerun differs on {len(d)} values, e.g. {d[:3]}."
            )
        runs = [done[(v.name, s)] for v in variants for s in seeds if (v.name, s) in done]
        expected = [
            v for v in variants if not args.report_only or any(r.variant == v.name for r in runs)
        ]
        all_ok &= all(r.ok for r in runs) and len(runs) == len(expected) * len(seeds)
        # references of this section's variants run in another section (or an earlier
        # invocation with the same out-dir and settings): their runs on disk
        names = {v.name for v in variants}
        refs = [every[v.reference] for v in variants if v.reference and v.reference not in names]
        refs = list(dict.fromkeys(refs))
        for v in refs:
            for s in seeds:
                d = out / "runs" / f"{v.name}_s{s}"
                r = done.get((v.name, s)) or (
                    finished_run(v.name, s, d)
                    if args.report_only
                    else reusable_run(config, v, s, run_overrides, d)
                )
                if r is not None:
                    runs.append(r)
        text = report_section(
            name,
            variants,
            runs,
            cfg_for,
            seeds,
            out,
            results_md,
            command,
            args.config,
            wall,
            repro,
            base,
            HEADINGS[name] + args.heading_suffix,
            code,
            refs,
            machine,
        )
        print(text, flush=True)
        print(f"wrote {out / (name + '.png')} and the section in {results_md}", flush=True)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
