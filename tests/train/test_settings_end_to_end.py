"""Settings through `archer train` as a user runs it (the console script, a subprocess,
no warning options of its own): a quiet start, `data.eval_files` with synthetic training
data, `train.log_every`, and the forking rule's `algorithm.token_rule.scope` in the real
trainer.

The runs use the demo config shrunk by overrides (a 20-step warm start, 8 prompts x 8
samples, one update per step), so each takes seconds of compute plus start-up.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from archer_mcore import KNOWN_HARMLESS_WARNINGS, quiet_known_warnings
from archer_mcore.algo.token_groups import forking_k

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"
SMALL = (
    "train.torch_threads=1",
    "warmstart.steps=20",
    "warmstart.examples=256",  # fewer than the training prompts (a config rule)
    "data.synthetic_train_size=512",
    "data.synthetic_eval_size=16",
    "train.prompts_per_step=8",
    "train.mini_batch_prompts=8",
    "rollout.n_samples_per_prompt=8",
    "algorithm.group_filter=none",
    "checkpoint.save_every=0",
)
#: The project's own output lines (cli, loop, components, the `archer` loggers).
PROJECT_LINES = (
    r"warm start \d+/\d+ \| sft loss [\d.]+",
    r"step \d+/\d+( \| .+)?",
    r"held-out accuracy: [\d.]+ at step \d+ -> [\d.]+ at step \d+ \([+-][\d.]+ points\)",
    r"metrics: http://\S+/metrics",
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} archer(\.\w+)*: .+",  # cli's logging format
)


def _archer() -> list[str]:
    script = Path(sys.executable).with_name("archer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "archer_mcore.cli"]


def _env() -> dict[str, str]:
    """The caller's environment without warning options or rendezvous settings."""
    drop = ("PYTHONWARNINGS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _train(out: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [*_archer(), "train", str(DEMO)]
    for o in (*SMALL, f"warmstart.cache_dir={cache}", f"train.output_dir={out}", *overrides):
        cmd += ["-o", o]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(out: Path) -> list[dict[str, float]]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """3 steps, a step line every 2nd step, eval at 0 and 3 on a user's 5-prompt file."""
    tmp = tmp_path_factory.mktemp("run")
    user = tmp / "my_eval.jsonl"
    rows = [
        {"prompt": f"Compute {i} + 2.", "answer": str(i + 2), "data_source": "user_math"}
        for i in range(5)
    ]
    user.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "out"
    proc = _train(
        out,
        cache,
        "train.steps=3",
        "train.log_every=2",
        "eval.every=3",
        f"data.eval_files=[{user}]",
    )
    return out, proc.stdout, proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_the_start_prints_only_the_projects_own_lines(run):
    _, stdout, stderr = run
    lines = [ln for ln in (stdout + stderr).splitlines() if ln.strip()]
    foreign = [ln for ln in lines if not any(re.fullmatch(p, ln) for p in PROJECT_LINES)]
    assert not foreign, "lines that are not the project's:\n" + "\n".join(foreign)
    assert not any("Warning" in ln or "site-packages" in ln for ln in lines)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_eval_uses_the_users_eval_files_with_synthetic_training(run):
    out, _, _ = run
    for step in (0, 3):
        summary = json.loads((out / "eval" / f"step_{step:06d}.json").read_text())
        assert set(summary) == {"all", "user_math"}  # no synthetic held-out problem
        assert summary["user_math"]["prompts"] == 5
        assert summary["user_math"]["samples_per_prompt"] == 4  # the demo's eval.n_samples


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_log_every_prints_every_second_step_and_records_all(run):
    out, stdout, _ = run
    printed = [ln.split(" | ")[0] for ln in stdout.splitlines() if ln.startswith("step ")]
    # The baseline eval (step 0), step 2 by the period, step 3 (the last, with its eval).
    assert printed == ["step 0/3", "step 2/3", "step 3/3"]
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(500)
@pytest.mark.parametrize("scope", ["mini_batch", "micro_batch"])
def test_forking_scope_in_the_trainer(scope, cache, tmp_path):
    # One update per step over the whole 64-response mini-batch, split by a small token
    # budget into many micro-batches. Mini-batch scope: exactly k = forking_k(N) tokens
    # of the N in the mini-batch get gradient. Micro-batch scope: each micro-batch picks
    # its own max(1, ceil(rho N_i)), which sums to more.
    out = tmp_path / "out"
    _train(
        out,
        cache,
        "algorithm.name=forking",
        f"algorithm.token_rule.scope={scope}",
        "algorithm.group_filter=none",
        "parallel.micro_batch_tokens=256",
        "train.steps=1",
        "eval.every=0",
    )
    (row,) = _metrics(out)
    n, selected = int(row["tokens/all"]), int(row["tokens/forking"])
    assert n > 0
    if scope == "mini_batch":
        assert selected == forking_k(n, 0.2)
    else:
        assert selected > forking_k(n, 0.2)


def test_known_warnings_are_filtered_exactly(monkeypatch):
    # Each listed warning is hidden; the same message from another module, another
    # message from the same module, or another category still show.
    assert all(module for _, _, module, _ in KNOWN_HARMLESS_WARNINGS)
    monkeypatch.setattr(sys, "warnoptions", [])
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_known_warnings()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        warnings.warn_explicit(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            UserWarning,
            "optimizer/__init__.py",
            24,
            module="megatron.core.optimizer",
        )
        warnings.warn_explicit(
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            UserWarning,
            "mine.py",
            1,
            module="archer_mcore.train.loop",
        )
        warnings.warn_explicit(
            "something new went wrong", UserWarning, "x.py", 1, module="megatron.core.optimizer"
        )
        warnings.warn_explicit(
            "Please use DTensor instead and we are deprecating ShardedTensor.",
            FutureWarning,
            "default_planner.py",
            503,
            module="torch.distributed.checkpoint.default_planner",
        )
        warnings.warn_explicit(
            "Please use DTensor instead and we are deprecating ShardedTensor.",
            DeprecationWarning,  # another category: shown
            "default_planner.py",
            503,
            module="torch.distributed.checkpoint.default_planner",
        )
    shown = [(w.category, str(w.message), w.filename) for w in caught]
    assert shown == [
        (
            UserWarning,
            "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
            "mine.py",
        ),
        (UserWarning, "something new went wrong", "x.py"),
        (
            DeprecationWarning,
            "Please use DTensor instead and we are deprecating ShardedTensor.",
            "default_planner.py",
        ),
    ]


def test_the_users_warning_options_win(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", ["default"])
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    with warnings.catch_warnings():
        before = list(warnings.filters)
        quiet_known_warnings()
        assert warnings.filters == before
