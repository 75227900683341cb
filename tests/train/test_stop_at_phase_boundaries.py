"""Pre-emption at phase boundaries (issue 27, item 5): a SIGUSR1 (Slurm's `--signal`)
sent to the real trainer mid-generation or mid-update writes a checkpoint within a
bounded time and exits 0, and `archer train --resume` continues at the right step, so
that the metrics of both runs together hold every step once, and the run ends exactly
where the uninterrupted reference run ends (same samples, metrics and final weights).

- Mid-generation (the latency-model engine makes each generate call take 6 s; the
  signal goes out when step 1's line is printed, so it lands in step 2's rollout):
  step 2 is dropped at the next boundary and step 1 saved; the resumed run redoes step
  2 from the same prompts and sampler state (its rollout equals the dropped one).
- Mid-update (a test hook holds the update of step 2 for 6 s once it has begun, and
  announces it): the update finishes, step 2 is saved at once, without its weight
  sync; the resumed run's initial sync gives the engine those weights (the rollout of
  step 3 carries weight version 2).
- Two ranks under torchrun, the signal to rank 1 alone while it waits for rank 0's
  generation batch: both ranks agree at the same boundary (one all-reduce on the gloo
  control group) and stop there, rank 0 reporting a signal on another rank.
- Async rollout (`rollout.async_steps: 1`): the stop is agreed when the trainer takes
  step 2's batch; step 1's checkpoint keeps step 2's first batch (the scheduler records
  it), and the resumed run matches an uninterrupted async run.

On the trainer before this change (the stop flag read only after the step's weight
sync and eval) each of these fails: the signal ends the run only after step 2 has
synced and been saved (checkpoint at step 2, "step 2 dropped" never printed, step 2's
`sync/bytes` non-zero). Measured on a 2-core machine: mid-generation 65-72 s,
mid-update about 60 s, torchrun about 125 s, async 105-140 s (its own reference run
included), plus 20-30 s for the shared reference run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from archer_mcore.metrics.keys import WALL_CLOCK_PREFIXES

GENERATE_S = 6.0  # every generate call's modelled wall time (latency hook)
HOLD_S = 6.0  # how long the hook holds the update of the chosen step
SAVE_BOUND_S = 60.0  # signal -> exit: one boundary away, plus the save, on a busy CPU

# Installed before the conftest driver runs: `hold_update` (a step) makes that step's
# update announce itself and wait HOLD_S once it has begun; `announce_pid` prints each
# rank's pid (torchrun workers are not the test's children).
STOP_DRIVER = r"""
import json
import os
import runpy
import sys
import time

hooks = json.loads(os.environ.get("ARCHER_STOP_TEST_HOOKS") or "{}")

if hooks.get("announce_pid"):
    print(f"test hook: rank {os.environ.get('RANK', '0')} pid {os.getpid()}", flush=True)

if hooks.get("hold_update"):
    import archer_mcore.train.loop as loop

    real_update_policy = loop.update_policy

    def update_policy(*args, **kwargs):
        step = sys._getframe(1).f_locals["step"]  # the RL loop's step variable
        if step == hooks["hold_update"]:
            print(f"test hook: update of step {step} begun", flush=True)
            time.sleep(hooks["hold_s"])
        return real_update_policy(*args, **kwargs)

    loop.update_policy = update_policy

driver = sys.argv.pop(1)
sys.argv[0] = driver
runpy.run_path(driver, run_name="__main__")
"""

VOLATILE = WALL_CLOCK_PREFIXES


@pytest.fixture(scope="module")
def stop_driver(archer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stop") / "stop_driver.py"
    path.write_text(STOP_DRIVER)
    return path


def _popen(
    archer, helpers, driver: Path, overrides: list[str], *extra: str,
    hooks: dict[str, Any] | None = None, stop_hooks: dict[str, Any] | None = None,
    torchrun: int = 0,
) -> subprocess.Popen:  # fmt: skip
    """`archer train` through STOP_DRIVER (then the conftest driver), optionally under
    torchrun with `torchrun` ranks; stdout and stderr merged, line-buffered."""
    cmd = archer.command("train", overrides, *extra)
    cmd = [sys.executable, str(driver), *cmd[1:]]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(torchrun)]  # fmt: skip
        cmd = [*launcher, *cmd[1:]]
    env = helpers.child_env(hooks)
    env["ARCHER_STOP_TEST_HOOKS"] = json.dumps(stop_hooks or {})
    return subprocess.Popen(
        cmd,
        cwd=helpers.DEMO_CONFIG.parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )


def _signal_when(proc: subprocess.Popen, trigger: str, send, timeout: float = 400.0):
    """Read the merged output until a line contains `trigger`, call `send(lines)`, then
    read to the end. Returns (output, seconds from the signal to the exit)."""
    lines: list[str] = []
    sent_at = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if sent_at is None and trigger in line:
            send(lines)
            sent_at = time.monotonic()
        if time.monotonic() > deadline:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    out = "".join(lines)
    assert sent_at is not None, out[-6000:]
    return out, time.monotonic() - sent_at


def _finish(proc: subprocess.Popen, timeout: float = 400.0) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"archer train timed out after {timeout}s\n{out[-6000:]}")
    return out


def _trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _steps(helpers, out: Path) -> list[int]:
    return [int(r["step"]) for r in helpers.read_metrics(out)]


def _same_as_reference(helpers, reference_run: Path, out: Path, skip: dict[int, set[str]]) -> None:
    """Every step's metrics (but wall-clock ones and `skip[step]`) and the final weights
    equal the uninterrupted reference run's."""
    n = helpers.REFERENCE_STEPS
    rows, ref_rows = helpers.read_metrics(out), helpers.read_metrics(reference_run)
    assert [int(r["step"]) for r in rows] == list(range(1, n + 1))  # none twice, none skipped
    for a, b in zip(ref_rows, rows):
        keep = [k for k in a if not k.startswith(VOLATILE) and k not in skip.get(int(a["step"]), ())]
        assert {k: a[k] for k in keep} == {k: b.get(k) for k in keep}, a["step"]
    final = f"step_{n:08d}"
    ref_w = helpers.model_weights(helpers.checkpoint(reference_run / "checkpoints" / final))
    w = helpers.model_weights(helpers.checkpoint(out / "checkpoints" / final))
    assert ref_w.keys() == w.keys() and len(w) > 5
    for key in ref_w:
        assert torch.equal(ref_w[key], w[key]), key


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigusr1_mid_generation_drops_the_step_saves_the_last_and_resumes_exactly(
    archer, helpers, reference_run, stop_driver, tmp_path
):
    n = helpers.REFERENCE_STEPS
    out = tmp_path / "run"
    overrides = [*helpers.REFERENCE, f"train.output_dir={out}"]
    trace = out / "trace.jsonl"
    hooks = {"trace": str(trace), "latency": {"per_call_s": GENERATE_S, "per_token_s": 0.0}}
    proc = _popen(archer, helpers, stop_driver, overrides, hooks=hooks)
    try:
        stdout, exit_s = _signal_when(
            proc, f"step 1/{n} ", lambda _: proc.send_signal(signal.SIGUSR1)
        )
    finally:
        helpers.kill_group(proc)
    assert proc.returncode == 0, stdout[-6000:]
    assert (
        "received SIGUSR1: checkpoint written at step 1 " in stdout
        and "step 2 dropped before its update (stopped after rollout)" in stdout
    ), stdout[-6000:]
    assert exit_s < GENERATE_S + SAVE_BOUND_S, f"{exit_s:.0f} s from SIGUSR1 to the exit"
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert _steps(helpers, out) == [1]
    assert len(_trace(trace)) == 2  # step 1's rollout and step 2's, dropped

    resumed = _finish(_popen(archer, helpers, stop_driver, overrides, "--resume",
                             hooks={"trace": str(trace)}))  # fmt: skip
    assert f"resumed from {root / 'step_00000001'} (step 1)" in resumed, resumed[-6000:]
    # The resumed run redoes step 2 from the state before its rollout: the same prompts
    # and samples as the dropped rollout; without it, the reference run's calls.
    calls = _trace(trace)
    assert calls[1] == calls[2]
    assert calls[:1] + calls[2:] == _trace(reference_run / "trace.jsonl")
    _same_as_reference(helpers, reference_run, out, skip={})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigusr1_mid_update_saves_the_step_without_its_sync_and_resume_syncs_it(
    archer, helpers, reference_run, stop_driver, tmp_path
):
    out = tmp_path / "run"
    overrides = [*helpers.REFERENCE, f"train.output_dir={out}"]
    trace = out / "trace.jsonl"
    proc = _popen(archer, helpers, stop_driver, overrides, hooks={"trace": str(trace)},
                  stop_hooks={"hold_update": 2, "hold_s": HOLD_S})  # fmt: skip
    try:
        stdout, exit_s = _signal_when(
            proc, "test hook: update of step 2 begun", lambda _: proc.send_signal(signal.SIGUSR1)
        )
    finally:
        helpers.kill_group(proc)
    assert proc.returncode == 0, stdout[-6000:]
    assert "received SIGUSR1: checkpoint written at step 2 " in stdout, stdout[-6000:]
    assert exit_s < HOLD_S + SAVE_BOUND_S, f"{exit_s:.0f} s from SIGUSR1 to the exit"
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert rows[0]["sync/bytes"] > 0 and rows[1]["sync/bytes"] == 0  # step 2 not synced

    resumed = _finish(_popen(archer, helpers, stop_driver, overrides, "--resume",
                             hooks={"trace": str(trace)}))  # fmt: skip
    assert f"resumed from {root / 'step_00000002'} (step 2)" in resumed, resumed[-6000:]
    # initial_sync gave the engine step 2's weights: step 3 samples with version 2
    calls = _trace(trace)
    assert [c["versions"] for c in calls] == [[0], [1], [2], [3], [4]]
    assert calls == _trace(reference_run / "trace.jsonl")
    _same_as_reference(helpers, reference_run, out, skip={2: {"sync/bytes"}})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigusr1_to_one_rank_under_torchrun_stops_both_at_the_same_boundary(
    archer, helpers, stop_driver, tmp_path
):
    out = tmp_path / "tp2"
    overrides = [
        *helpers.FAST, "algorithm.group_filter=none", "train.steps=3",
        "checkpoint.save_every=0", "parallel.tensor_model_parallel_size=2",
        f"train.output_dir={out}",
    ]  # fmt: skip
    latency = {"latency": {"per_call_s": GENERATE_S, "per_token_s": 0.0}}
    proc = _popen(archer, helpers, stop_driver, overrides, hooks=latency,
                  stop_hooks={"announce_pid": True}, torchrun=2)  # fmt: skip

    def signal_rank_1(lines: list[str]) -> None:
        pids = [m.group(1) for ln in lines if (m := re.search(r"rank 1 pid (\d+)", ln))]
        assert pids, "".join(lines)
        os.kill(int(pids[0]), signal.SIGUSR1)

    try:
        stdout, exit_s = _signal_when(proc, "step 1/3 ", signal_rank_1)
    finally:
        helpers.kill_group(proc)
    assert proc.returncode == 0, stdout[-6000:]
    assert (
        "received signal on another rank: checkpoint written at step 1 " in stdout
        and "step 2 dropped before its update (stopped after rollout)" in stdout
    ), stdout[-6000:]
    assert exit_s < GENERATE_S + SAVE_BOUND_S, f"{exit_s:.0f} s from SIGUSR1 to the exit"
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert _steps(helpers, out) == [1]

    resumed = _finish(_popen(archer, helpers, stop_driver, overrides, "--resume", torchrun=2))
    assert f"resumed from {root / 'step_00000001'} (step 1)" in resumed, resumed[-6000:]
    assert _steps(helpers, out) == [1, 2, 3]
    from archer_mcore.actor.checkpoint_store import verify_checkpoint

    manifest = verify_checkpoint(root / "step_00000003")
    assert (manifest["step"], manifest["world_size"]) == (3, 2)


ASYNC = ("rollout.async_steps=1", "rollout.mode=disaggregated", "rollout.tis_cap=2.0")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigusr1_with_async_rollout_keeps_the_recorded_batch_and_resumes_exactly(
    archer, helpers, stop_driver, tmp_path
):
    # Step 2's batch is generated (6 s) while step 1 trains; the signal goes out when
    # step 1 reports, while the trainer waits for that batch. The stop is agreed when the
    # batch is taken (the producer's batches are not boundaries every rank meets): step 2
    # is dropped, and step 1's checkpoint keeps step 2's first batch, which the scheduler
    # records, so the resumed run does not generate it again.
    run = [*helpers.FAST, *ASYNC, "algorithm.group_filter=none", "train.steps=4",
           "checkpoint.save_every=0"]  # fmt: skip
    latency = {"per_call_s": GENERATE_S, "per_token_s": 0.0}
    ref = tmp_path / "ref"
    proc = archer.run("train", [*run, f"train.output_dir={ref}"],
                      hooks={"trace": str(ref / "trace.jsonl"), "latency": latency}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]

    out = tmp_path / "run"
    trace = out / "trace.jsonl"
    proc = _popen(archer, helpers, stop_driver, [*run, f"train.output_dir={out}"],
                  hooks={"trace": str(trace), "latency": latency})  # fmt: skip
    try:
        stdout, exit_s = _signal_when(proc, "step 1/4 ", lambda _: proc.send_signal(signal.SIGUSR1))
    finally:
        helpers.kill_group(proc)
    assert proc.returncode == 0, stdout[-6000:]
    m = re.search(r"received SIGUSR1: checkpoint written at step (\d+) ", stdout)
    assert m, stdout[-6000:]
    k = int(m.group(1))
    # the batch in flight when the run stops finishes before the exit (close joins it)
    assert exit_s < 2 * GENERATE_S + SAVE_BOUND_S, f"{exit_s:.0f} s from SIGUSR1 to the exit"
    # step 1's training (under a second) ends long before step 2's 6 s batch is done
    assert k == 1 and _steps(helpers, out) == [1], stdout[-6000:]
    assert "step 2 dropped before its update (stopped after collect)" in stdout
    step_dir = out / "checkpoints" / f"step_{k:08d}"
    extra = torch.load(step_dir / "extra_state.pt", weights_only=True)["extra"]
    assert extra["async_pending"]["step"] == k + 1  # the next step's first batch, kept
    first_run = _trace(trace)

    resumed = _finish(_popen(archer, helpers, stop_driver, [*run, f"train.output_dir={out}"],
                             "--resume", hooks={"trace": str(trace), "latency": latency}))  # fmt: skip
    assert f"resumed from {step_dir} (step {k})" in resumed, resumed[-6000:]
    second_run = _trace(trace)[len(first_run) :]
    # steps 1..k and step k+1's first batch came from the first run; a batch it
    # generated after that (in flight at the stop) the resumed run generates alike
    used = k + 1
    assert first_run[used:] == second_run[: len(first_run) - used]
    assert first_run[:used] + second_run == _trace(ref / "trace.jsonl")
    rows, ref_rows = helpers.read_metrics(out), helpers.read_metrics(ref)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for a, b in zip(ref_rows, rows):
        keep = [key for key in a if not key.startswith(VOLATILE)]
        assert {key: a[key] for key in keep} == {key: b.get(key) for key in keep}, a["step"]
    wa = helpers.model_weights(helpers.checkpoint(ref / "checkpoints" / "step_00000004"))
    wb = helpers.model_weights(helpers.checkpoint(out / "checkpoints" / "step_00000004"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[key], wb[key]) for key in wa)
