#!/usr/bin/env python
"""Compare GRPO, DAPO, Archer and forking-token RL on the CPU demo task.

Design (what is shared, what varies):
- One warm start for every run. The config's `train.seed` fixes the synthetic data
  (train and held-out problems) and the supervised warm start; both are made once
  (the warm start by a real `archer train -o train.steps=0`, cached), then every RL run
  starts from that model (`model.path`) on those files (`data.train_files` /
  `data.eval_files`), so the step-0 baseline is the same policy for all runs.
- The seed of a run (`train.seed=SEED`) varies only the RL part: the sampler's prompt
  order, the rollout sampling stream, the update's mini-batch order and the eval
  sampling stream.
- Equal budget: the same RL steps, prompts per step, samples per prompt, epochs and
  optimizer for every algorithm. DAPO and forking refill filtered groups with extra
  generation batches (dynamic sampling), so they may generate more samples per step;
  the table reports generated samples per run.

Each run is one `archer train` subprocess (torch threads 1) with its own output
directory; its `metrics.jsonl` is parsed afterwards. Outputs in --out-dir:
`algorithms.png` (held-out accuracy, mean +- std over seeds; mean token entropy per
token group), `table.md`, `summary.json`, `runs/<algo>_s<seed>/` and a section
"## Algorithm comparison (CPU demo task)" written into --results-md.

Usage:
    python benchmarks/algorithms.py                       # 3 seeds x 4 algorithms
    python benchmarks/algorithms.py --steps 40 --seeds 1234 1235 1236 --jobs 1
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Algorithm comparison (CPU demo task)"
ALGORITHMS = ("grpo", "dapo", "archer", "forking")
#: token groups whose mean entropy is plotted per algorithm (`entropy/<group>` metrics)
ENTROPY_GROUPS = {
    "grpo": ("all",),
    "dapo": ("all",),
    "archer": ("all", "knowledge", "reasoning"),
    "archer_math": ("all", "knowledge", "reasoning"),
    "forking": ("all", "forking", "other"),
}
#: a tiny budget for `--smoke` (the test runs it; < 90 s on 2 shared cores)
SMOKE_OVERRIDES = (
    "data.synthetic_train_size=128",
    "data.synthetic_eval_size=12",
    "data.synthetic.min_operands=2",
    "data.synthetic.max_operands=2",
    "warmstart.steps=40",
    "warmstart.examples=64",
    "warmstart.batch_size=16",
    # megatron's distributed optimizer cannot checkpoint before its first step (an
    # assertion in DistributedOptimizer.state_dict), which a 2-step run whose groups
    # are all filtered out would hit; the plain optimizer can.
    "parallel.use_distributed_optimizer=false",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_new_tokens=24",
    "eval.every=1",
    "eval.n_samples=2",
    "eval.max_new_tokens=24",
    "algorithm.max_generation_batches=2",
)


@dataclass
class RunResult:
    algorithm: str
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

    The paths are computed with the trainer's own functions (components.py), the warm
    start itself is trained by a real `archer train` with zero RL steps; if the model
    directory it should have written is missing, the key computation here has drifted
    from the trainer's and this raises.
    """
    from archer_mcore.config import load_config
    from archer_mcore.data.prompt_dataset import PromptDataset
    from archer_mcore.train.components import (
        build_tokenizer,
        data_files,
        hf_config_dict,
        warmstart_examples,
    )
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
    examples = warmstart_examples(train_data, tokenizer, w.examples, w.noise, cfg.train.seed)
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


def run_one(
    config: str, algorithm: str, seed: int, overrides: Sequence[str], run_dir: Path
) -> RunResult:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl appends: start clean
    run_dir.mkdir(parents=True)
    cmd = archer_command(
        config,
        [
            *overrides,
            f"algorithm.name={algorithm}",
            f"train.seed={seed}",
            f"train.output_dir={run_dir}",
            f"train.run_name=bench_{algorithm}_s{seed}",
            "train.torch_threads=1",
            "metrics.enabled=false",
        ],
    )
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
    print(f"{algorithm:8s} seed {seed}: {len(rows)} steps, {wall:.0f}s, {status}", flush=True)
    return RunResult(algorithm, seed, str(run_dir), rc, wall, rows)


def finished_run(algorithm: str, seed: int, run_dir: Path) -> RunResult | None:
    """A run already on disk (for --report-only), or None; runs that did not reach
    their last step count as failed. Wall time comes from the run's result.json."""
    meta = run_dir / "result.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return RunResult(
        algorithm,
        seed,
        str(run_dir),
        int(info["returncode"]),
        float(info["wall_s"]),
        read_metrics(run_dir / "metrics.jsonl"),
    )


def baseline_accuracy(run_dir: Path) -> float | None:
    """The step-0 held-out accuracy (the warm-started policy), from eval/step_000000.json."""
    path = run_dir / "eval" / "step_000000.json"
    if not path.exists():
        return None
    allrow = json.loads(path.read_text())["all"]
    avg = [v for k, v in allrow.items() if k.startswith("avg@")]
    return float(avg[0]) if avg else None


# ----------------------------------------------------------------------------- statistics
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for fewer than two values)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def accuracy_curve(run: RunResult) -> dict[int, float]:
    """step -> held-out accuracy, step 0 (the warm start) included."""
    curve = {int(r["step"]): float(r["eval/accuracy"]) for r in run.rows if "eval/accuracy" in r}
    base = baseline_accuracy(Path(run.output_dir))
    if base is not None:
        curve[0] = base
    return dict(sorted(curve.items()))


def metric_curve(run: RunResult, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in run.rows if key in r}


def tail_mean(curve: dict[int, float], k: int = 5) -> float:
    """Mean of the last `k` values (the end of the run, smoothed over steps)."""
    vals = [curve[s] for s in sorted(curve)][-k:]
    return statistics.fmean(vals) if vals else math.nan


def generated_samples(run: RunResult, prompts_per_step: int, n: int) -> int:
    """Responses generated for training (every generation batch has prompts_per_step x n)."""
    return (
        int(sum(r.get("sampling/generation_batches", 0.0) for r in run.rows)) * prompts_per_step * n
    )


def summarise(
    runs: Sequence[RunResult], algorithms: Sequence[str], prompts_per_step: int, n: int
) -> list[dict[str, Any]]:
    table = []
    for algo in algorithms:
        rs = [r for r in runs if r.algorithm == algo and r.ok]
        curves = [accuracy_curve(r) for r in rs]
        finals = [c[max(c)] for c in curves if c]
        bests = [max(v for s, v in c.items() if s > 0) for c in curves if any(s > 0 for s in c)]
        gains = [c[max(c)] - c[0] for c in curves if 0 in c and max(c) > 0]
        row: dict[str, Any] = {
            "algorithm": algo,
            "seeds_ok": len(rs),
            "seeds_failed": sum(1 for r in runs if r.algorithm == algo and not r.ok),
            "baseline": mean_std([c.get(0, math.nan) for c in curves]),
            "final": mean_std(finals),
            "best": mean_std(bests),
            "gain": mean_std(gains),
            "train_accuracy_end": mean_std(
                [tail_mean(metric_curve(r, "reward/accuracy")) for r in rs]
            ),
            "wall_s": mean_std([r.wall_s for r in rs]),
            "samples": mean_std([generated_samples(r, prompts_per_step, n) for r in rs]),
            "updates": mean_std([float(sum(1 for x in r.rows if "entropy/all" in x)) for r in rs]),
        }
        for g in ENTROPY_GROUPS.get(algo, ("all",)):
            row[f"entropy_{g}"] = mean_std([tail_mean(metric_curve(r, f"entropy/{g}")) for r in rs])
        table.append(row)
    return table


def fmt(ms: tuple[float, float], digits: int = 3) -> str:
    m, s = ms
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(table: Sequence[dict[str, Any]]) -> str:
    head = (
        "| algorithm | seeds | step-0 acc | final acc | best acc | gain (final − step 0) "
        "| train acc (last 5 steps) | entropy all | entropy by group (last 5 steps) "
        "| updates | generated samples | wall time (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in table:
        groups = [k for k in row if k.startswith("entropy_") and k != "entropy_all"]
        by_group = ", ".join(f"{k.removeprefix('entropy_')} {fmt(row[k])}" for k in groups) or "–"
        seeds = f"{row['seeds_ok']}" + (
            f" ({row['seeds_failed']} failed)" if row["seeds_failed"] else ""
        )
        lines.append(
            f"| {row['algorithm']} | {seeds} | {fmt(row['baseline'])} | {fmt(row['final'])} "
            f"| {fmt(row['best'])} | {fmt(row['gain'])} | {fmt(row['train_accuracy_end'])} "
            f"| {fmt(row.get('entropy_all', (math.nan, math.nan)))} | {by_group} "
            f"| {fmt(row['updates'], 1)} | {fmt(row['samples'], 0)} | {fmt(row['wall_s'], 0)} |"
        )
    return head + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
def _band(curves: Sequence[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every curve, with mean and sample std over curves."""
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_std([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def plot(runs: Sequence[RunResult], algorithms: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(algorithms, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    styles = {"all": "-", "knowledge": "--", "reasoning": ":", "forking": ":", "other": "--"}
    fig, (ax_acc, ax_ent) = plt.subplots(1, 2, figsize=(13, 4.8))
    for algo in algorithms:
        rs = [r for r in runs if r.algorithm == algo and r.ok]
        steps, mean, std = _band([accuracy_curve(r) for r in rs])
        if steps:
            ax_acc.plot(steps, mean, marker="o", color=colors[algo], label=f"{algo} (n={len(rs)})")
            ax_acc.fill_between(
                steps,
                [m - s for m, s in zip(mean, std)],
                [m + s for m, s in zip(mean, std)],
                color=colors[algo],
                alpha=0.15,
            )
        for g in ENTROPY_GROUPS.get(algo, ("all",)):
            steps, mean, std = _band([metric_curve(r, f"entropy/{g}") for r in rs])
            if steps:
                ax_ent.plot(
                    steps,
                    mean,
                    styles.get(g, "-"),
                    color=colors[algo],
                    marker=".",
                    ms=3,
                    label=f"{algo}: {g}",
                )
    ax_acc.set(
        xlabel="RL step",
        ylabel="held-out accuracy (avg@k)",
        title="Held-out accuracy, mean ± std over seeds",
    )
    ax_ent.set(
        xlabel="RL step",
        ylabel="mean token entropy (nats)",
        yscale="log",
        title="Mean entropy per token group (mean over seeds)",
    )
    ax_acc.grid(alpha=0.3)
    ax_ent.grid(alpha=0.3, which="both")
    ax_acc.legend(fontsize=8)
    ax_ent.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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


def replace_section(text: str, section: str) -> str:
    """`text` with the SECTION heading's block (up to the next '## ' heading) replaced,
    or `section` appended when the heading is absent."""
    lines = text.splitlines()
    if SECTION not in lines:
        body = text.rstrip("\n")
        return (body + "\n\n" if body else "# Benchmark results\n\n") + section.rstrip("\n") + "\n"
    start = lines.index(SECTION)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    new = lines[:start] + section.rstrip("\n").splitlines() + ([""] if end < len(lines) else [])
    return "\n".join(new + lines[end:]).rstrip("\n") + "\n"


def shown_command(argv: Sequence[str]) -> list[str]:
    """The benchmark's arguments as they produced the runs: without --report-only and
    without the --note text (which goes into the section itself)."""
    shown, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif a != "--report-only" and not a.startswith("--note="):
            shown.append(a)
    return shown


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="RL seeds (default: the config's train.seed and the next two)",
    )
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: config)")
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p.add_argument("--out-dir", default="benchmarks/results/algorithms")
    p.add_argument(
        "--results-md",
        default=None,
        help="markdown file whose algorithm section is replaced "
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
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (at most 2)")
    p.add_argument("--smoke", action="store_true", help="2 steps, 1 seed, tiny task and eval")
    p.add_argument("--note", default="", help="extra paragraph for the results section")
    args = p.parse_args(argv)

    from archer_mcore.config import load_config

    overrides = list(SMOKE_OVERRIDES if args.smoke else ()) + list(args.override)
    if args.smoke:
        args.steps = 2
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    out = Path(args.out_dir).resolve()
    frozen = out / "config.yaml"  # the copy the runs read (see below)
    # --report-only describes the runs: their frozen config, not today's file.
    source = frozen if args.report_only and frozen.exists() else Path(args.config)
    cfg = load_config(source, overrides)  # fail early on a bad key
    seeds = args.seeds or [cfg.train.seed + i for i in range(1 if args.smoke else 3)]
    if args.smoke:
        seeds = seeds[:1]
    out.mkdir(parents=True, exist_ok=True)
    results_md = Path(
        args.results_md or (out / "RESULTS.md" if args.smoke else REPO / "benchmarks/RESULTS.md")
    )

    t0 = time.perf_counter()
    # Every run reads one frozen copy: the config may be edited while the benchmark runs.
    if not args.report_only:
        shutil.copyfile(args.config, frozen)
    config = str(frozen)
    cache = Path(args.cache_dir).resolve() if args.cache_dir else out / "shared" / "cache"
    jobs = [
        (a, s) for s in seeds for a in args.algorithms
    ]  # seed-major: partial results stay balanced
    if args.report_only:
        run_overrides = list(overrides)
        runs = [finished_run(a, s, out / "runs" / f"{a}_s{s}") for a, s in jobs]
        runs = [r for r in runs if r is not None]
    else:
        shared = prepare_shared_start(
            config, overrides, out / "shared", cache, out / "warmstart.log"
        )
        run_overrides = [*overrides, *shared]
        with ThreadPoolExecutor(max_workers=max(1, min(2, args.jobs))) as pool:
            runs = list(
                pool.map(
                    lambda job: run_one(
                        config, job[0], job[1], run_overrides, out / "runs" / f"{job[0]}_s{job[1]}"
                    ),
                    jobs,
                )
            )
    total = time.perf_counter() - t0
    argv_shown = shown_command(argv if argv is not None else sys.argv[1:])
    previous = out / "summary.json"
    if args.report_only and previous.exists():
        total = float(json.loads(previous.read_text()).get("total_wall_s", total))

    n, pps = cfg.rollout.n_samples_per_prompt, cfg.train.prompts_per_step
    table = summarise(runs, args.algorithms, pps, n)
    png = out / "algorithms.png"
    title = (
        f"{Path(args.config).name}: {cfg.train.steps} RL steps x {pps} prompts x {n} samples, "
        f"seeds {seeds}"
    )
    plot(runs, args.algorithms, png, title)
    md = markdown_table(table)
    (out / "table.md").write_text(md)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "config": args.config,
                "overrides": run_overrides,
                "seeds": seeds,
                "algorithms": args.algorithms,
                "total_wall_s": total,
                "table": table,
                "runs": [{k: v for k, v in asdict(r).items() if k != "rows"} for r in runs],
            },
            indent=2,
            default=str,
        )
        + "\n"
    )

    command = shlex.join(["python", "benchmarks/algorithms.py", *argv_shown])
    try:
        png_link = os.path.relpath(png, results_md.resolve().parent)
    except ValueError:
        png_link = str(png)
    section = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}` (total {total / 60:.1f} min).  ",
            f"Machine: {machine_line()}.  ",
            f"Code: {code_line()}.  ",
            f"Config: `{args.config}` (the copy the runs read: "
            f"`{os.path.relpath(frozen, results_md.resolve().parent)}`) with {cfg.train.steps} RL steps x {pps} prompts x {n} samples "
            f"per step, {cfg.train.ppo_epochs} PPO epoch(s), lr {cfg.optimizer.lr:g}; eval every "
            f"{cfg.eval.every} steps on {cfg.data.synthetic_eval_size if not cfg.data.eval_files else 'the'} "
            f"held-out problems, avg@{cfg.eval.n_samples} at T={cfg.eval.temperature:g}. "
            f"Seeds {seeds} vary the RL run only (prompt order, sampling, mini-batch order); "
            "all runs start from one shared warm start (step 0).",
            "",
            md,
            f"![held-out accuracy and entropy per token group]({png_link})",
            "",
            "Columns: accuracies are held-out avg@k, mean ± sample std over seeds; 'final' is the "
            "last eval, 'best' the best eval after step 0; entropies are the mean per-token entropy "
            "of the trained responses under the current policy (`entropy/<group>`), averaged over "
            "the last 5 steps with an update; 'generated samples' counts every training response "
            "generated, including DAPO/forking's refill batches.",
            "",
            *([args.note, ""] if args.note else []),
        ]
    )
    results_md.parent.mkdir(parents=True, exist_ok=True)
    old = results_md.read_text() if results_md.exists() else ""
    results_md.write_text(replace_section(old, section))
    print(md)
    print(f"wrote {png}, {out / 'table.md'}, section in {results_md} ({total:.0f}s)")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
