"""rollout.async_steps = 1 on the CPU trainer (real `archer train` runs on the demo model,
the local engine behind a latency model so that generation takes wall time that a
second thread can hide): the version rule per generation batch, staleness, overlap
against a synchronous run, and exact resume from a checkpoint taken with a batch in
flight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from archer_mcore.metrics.keys import WALL_CLOCK_PREFIXES

pytestmark = pytest.mark.slow

# Generation is slept: 64 samples x ~20 tokens x 1.5 ms ~ 2 s per batch.
LATENCY = {"per_token_s": 0.0015, "per_call_s": 0.2}
# Closer to the training time of these small steps (~0.5 s): more of it can be hidden.
SHORT_LATENCY = {"per_token_s": 0.0005, "per_call_s": 0.1}
ASYNC = ("rollout.async_steps=1", "rollout.mode=disaggregated", "rollout.tis_cap=2.0")
# Metrics that are wall-clock measurements (differ between any two runs).
VOLATILE = WALL_CLOCK_PREFIXES


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _expected_versions(rows: list[dict]) -> list[int]:
    """The engine version of every training generation call, from the step metrics
    alone: step s's first batch samples with the last weights synced at or before step
    s - 2 (0 before any), its refills with those synced at or before step s - 1 (a step
    syncs iff it updated, i.e. reports sync/bytes)."""
    synced = [0] + [int(r["step"]) for r in rows if "sync/bytes" in r]

    def last_sync(upto: int) -> int:
        return max(v for v in synced if v <= max(upto, 0))

    out = []
    for r in rows:
        s = int(r["step"])
        out.append(last_sync(s - 2))
        out += [last_sync(s - 1)] * (int(r["sampling/generation_batches"]) - 1)
    return out


def _stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.timeout(900)
def test_async_versions_and_exact_resume_with_a_batch_in_flight(archer, helpers, tmp_path):
    run = [
        *helpers.FAST,
        *ASYNC,
        "algorithm.group_filter=refill",  # refills of step k+1 run after step k's sync
        "algorithm.max_generation_batches=2",
        "train.steps=4",
        "checkpoint.save_every=2",
    ]
    a = tmp_path / "a"
    proc = archer.run("train", [*run, f"train.output_dir={a}"],
                      hooks={"trace": str(a / "trace.jsonl"), "latency": LATENCY}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = helpers.read_metrics(a)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    trace = _trace(a / "trace.jsonl")
    # every call samples with one weight version, the one the version rule gives
    assert all(len(c["versions"]) == 1 for c in trace), trace
    assert [c["versions"][0] for c in trace] == _expected_versions(rows)
    for r in rows:  # no trained sample more than one version old (the trainer checks too)
        assert 0.0 <= r["rollout/staleness_max"] <= 1.0
    assert rows[0]["rollout/staleness_max"] == 0.0  # step 1 samples the initial weights
    if "sync/bytes" in rows[0]:
        assert rows[1]["rollout/staleness_max"] == 1.0  # step 2's batch 1 saw version 0

    # Resume from the step-2 checkpoint (step 3's first batch was in flight) into a
    # fresh directory: steps 3 and 4 and the final weights are those of the run above.
    b = tmp_path / "b"
    (b / "checkpoints").mkdir(parents=True)
    shutil.copytree(a / "checkpoints" / "step_00000002", b / "checkpoints" / "step_00000002")
    extra = torch.load(b / "checkpoints" / "step_00000002" / "extra_state.pt", weights_only=True)
    pending = extra["extra"]["async_pending"]
    assert pending["step"] == 3 and len(pending["groups"]) == 8
    proc = archer.run("train", [*run, f"train.output_dir={b}"], "--resume",
                      hooks={"trace": str(b / "trace.jsonl"), "latency": LATENCY}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed_rows = helpers.read_metrics(b)
    assert _stable(resumed_rows) == _stable(rows[2:])
    resumed_trace = _trace(b / "trace.jsonl")  # step 3's first batch is not generated again
    assert len(resumed_trace) == sum(int(r["sampling/generation_batches"]) for r in rows[2:]) - 1
    assert resumed_trace == trace[len(trace) - len(resumed_trace):]
    final_a = helpers.checkpoint(a / "checkpoints" / "step_00000004")
    final_b = helpers.checkpoint(b / "checkpoints" / "step_00000004")
    wa, wb = helpers.model_weights(final_a), helpers.model_weights(final_b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = helpers.optimizer_tensors(final_a), helpers.optimizer_tensors(final_b)
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


@pytest.mark.timeout(900)
def test_async_hides_generation_behind_training(archer, helpers, tmp_path):
    run = [*helpers.FAST, "algorithm.group_filter=none", "train.steps=4"]
    rows = {}
    for name, extra in (("sync", ()), ("async", ASYNC)):
        out = tmp_path / name
        proc = archer.run("train", [*run, *extra, f"train.output_dir={out}"],
                          hooks={"latency": SHORT_LATENCY}, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        # step 1 waits for its batch in both modes; the last has no next batch to overlap
        rows[name] = helpers.read_metrics(out)[1:-1]
    for r in rows["sync"]:
        assert r["overlap/fraction"] == 0.0 and r["rollout/staleness_max"] == 0.0
        # the trainer waits for the whole (slept) generation
        assert r["overlap/trainer_idle_s"] >= r["time/rollout"]
    for r in rows["async"]:
        assert r["rollout/staleness_max"] == 1.0
        # at most T_train / T_gen of the generation can hide behind training
        assert r["overlap/fraction"] > 0.15, r
    idle = {k: sum(r["overlap/trainer_idle_fraction"] for r in v) / len(v) for k, v in rows.items()}
    assert idle["async"] < idle["sync"], idle


@pytest.mark.timeout(600)
def test_async_with_two_ranks_under_torchrun(archer, helpers, tmp_path):
    """TP=2 (two ranks): rank 0's producer thread generates, every rank gets the
    groups, checks their staleness and joins each weight export."""
    import subprocess
    import sys

    from archer_mcore.actor.checkpoint_store import verify_checkpoint

    out = tmp_path / "tp2"
    overrides = [*helpers.FAST, *ASYNC, "algorithm.group_filter=none", "train.steps=3",
                 "parallel.tensor_model_parallel_size=2", f"train.output_dir={out}"]  # fmt: skip
    cmd = archer.command("train", overrides)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*torchrun, *cmd[1:]], cwd=str(helpers.DEMO_CONFIG.parents[1]),
                          env=helpers.child_env({"trace": str(out / "trace.jsonl")}),
                          capture_output=True, text=True, timeout=500, start_new_session=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [r["rollout/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert [c["versions"] for c in _trace(out / "trace.jsonl")] == [[0], [0], [1]]
    manifest = verify_checkpoint(out / "checkpoints" / "step_00000003")
    assert (manifest["tp"], manifest["world_size"]) == (2, 2)
