"""A shortened CPU demo run (configs/demo_cpu.yaml, fixed seed): metrics reach the
Prometheus exporter (scraped over HTTP while the run is live) and metrics.jsonl, a
checkpoint is written, and held-out accuracy ends strictly above the warm-started
policy's.

The warm start is the demo's own (400 supervised steps), cached in the demo's default
cache directory (.cache/archer/warmstart, keyed by its settings): the first run on a
machine pays for it once.
"""

from __future__ import annotations

import json

import pytest
from services import read_train_and_scrape

# The RL steps of the shortened run; the eval runs at step 0 (the warm-started policy)
# and at the last step.
DEMO_STEPS = 10


def _one(series: dict[tuple, float], **labels: str) -> float:
    hits = [v for k, v in series.items() if all(dict(k).get(n) == x for n, x in labels.items())]
    assert len(hits) == 1, (labels, series)
    return hits[0]


@pytest.fixture(scope="module")
def demo_run(archer, tmp_path_factory):
    """Runs the demo; scrapes /metrics once step 1 has been reported."""
    out = tmp_path_factory.mktemp("demo")
    overrides = [
        "train.torch_threads=1",
        f"train.steps={DEMO_STEPS}",
        f"eval.every={DEMO_STEPS}",
        f"train.output_dir={out}",
    ]
    proc = archer.popen("train", overrides, own_cache=False)
    stdout, stderr, scrape = read_train_and_scrape(proc)
    return {
        "out": out,
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
        "scrape": scrape,
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_exports_metrics_and_writes_a_checkpoint(demo_run, helpers):
    assert demo_run["returncode"] == 0, demo_run["stderr"][-4000:]
    out = demo_run["out"]
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == list(range(1, DEMO_STEPS + 1))
    step_dir = out / "checkpoints" / f"step_{DEMO_STEPS:08d}"
    from archer_mcore.actor.checkpoint_store import verify_checkpoint

    assert verify_checkpoint(step_dir)["step"] == DEMO_STEPS

    # The live scrape: the exporter served the step it had recorded, with the values
    # metrics.jsonl holds for that step.
    s = demo_run["scrape"]
    assert s is not None, "no /metrics scrape after step 1"
    step = int(max(s["archer_step"].values()))
    row = rows[step - 1]
    assert _one(s["archer_reward_mean"]) == pytest.approx(row["reward/mean"])
    assert _one(s["archer_accuracy_ratio"]) == pytest.approx(row["reward/accuracy"])
    assert _one(s["archer_loss"]) == pytest.approx(row["train/loss"])
    assert _one(s["archer_token_entropy_nats"], group="all") == pytest.approx(row["entropy/all"])
    assert _one(s["archer_steps_total"]) == step
    # Every key the trainer emitted reached Prometheus: none was dropped as unknown.
    dropped = [x for x in demo_run["stderr"].splitlines() if "metrics: dropped" in x]
    assert _one(s["archer_exporter_rejected_values_total"], reason="unknown_key") == 0, dropped


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_raises_heldout_accuracy_over_the_warm_start(demo_run):
    assert demo_run["returncode"] == 0, demo_run["stderr"][-4000:]
    ev = demo_run["out"] / "eval"
    before = json.loads((ev / "step_000000.json").read_text())["all"]
    after = json.loads((ev / f"step_{DEMO_STEPS:06d}.json").read_text())["all"]
    assert before["prompts"] == after["prompts"] == 200
    key = next(k for k in before if k.startswith("avg@"))
    assert after[key] > before[key], (before, after)
