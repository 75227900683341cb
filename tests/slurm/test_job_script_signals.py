"""slurm/archer_job.sh's stop signal reaches the training step only (issue 27 item 5).

Slurm delivers `--signal=B:USR1@lead` (and `scancel --batch --signal=USR1`) to the batch
shell. The script used to pass it on with `scancel --signal=USR1 $SLURM_JOB_ID`, which
signals every step: the SGLang servers and the router, which have no handler, died
while the trainer still needed them for the weight sync before its checkpoint.

Here the script runs under bash with stand-in `scontrol` (two nodes) and `srun`: each
step records the signals it gets in one event log; the training step answers SIGUSR1
by exiting after 1 s (its checkpoint), servers and router run until killed. The
stand-in `scancel` records its calls. What the stand-ins assume of the real ones: a
signal sent to an `srun` process is forwarded to the tasks of its step (Slurm's srun(1),
"SIGNALS AND ESCAPE SEQUENCES"), which the live Slurm tests exercise
(tests/slurm/test_slurm_live.py, the pre-emption tests send `scancel --batch
--signal=USR1`); `scontrol requeue <job>` requeues the job. After SIGUSR1 to the shell: the training step
got it, no server or router step did, they were stopped only after the training step
had exited, and the job asked to be requeued.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "slurm" / "archer_job.sh"
SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") tr ',' '\\n' <<<"$3" ;;
  "show node") echo "NodeName=$3 NodeAddr=10.0.0.${3#node} State=IDLE" ;;
  "requeue "*) echo "requeue $2" >>"$STUB_DIR/events" ;;
esac
"""
SCANCEL = """#!/bin/bash
echo "scancel $*" >>"$STUB_DIR/events"
"""
SRUN = """#!/bin/bash
case "$*" in
  *torch.distributed.run*) role=train ;;
  *--worker-urls*) role=router ;;
  *) role=server ;;
esac
log() { echo "$role $1" >>"$STUB_DIR/events"; }
log start
if [ "$role" = train ]; then
  trap 'log USR1; sleep 1; log exit; exit 0' USR1
else
  trap 'log USR1' USR1
  trap 'log TERM; exit 0' TERM
fi
while :; do sleep 0.05; done
"""
#: ARCHER_PYTHON: the servers' health probes pass at once
PYTHON = "#!/bin/bash\nexit 0\n"


@pytest.mark.timeout(120)
def test_usr1_stops_the_training_step_and_keeps_the_servers_until_it_exits(tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("scancel", SCANCEL),
                       ("python", PYTHON)):  # fmt: skip
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  run_name: sig\n")
    (tmp_path / "logs").mkdir()
    env = {
        "PATH": f"{stub}:/usr/bin:/bin", "STUB_DIR": str(stub), "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node1,node2", "ARCHER_CONFIG": str(cfg),
        "ARCHER_MODE": "disaggregated", "ARCHER_ROLLOUT_NODES": "1", "ARCHER_SGLANG_MODEL": "/m",
        "ARCHER_HOME": str(REPO), "ARCHER_LOG_DIR": str(tmp_path / "logs"),
        "ARCHER_PYTHON": str(stub / "python"), "ARCHER_NPROC_PER_NODE": "1",
    }  # fmt: skip
    events = stub / "events"
    job = subprocess.Popen(["bash", str(JOB)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "train start" not in (events.read_text() if events.exists() else ""):
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read()
            time.sleep(0.05)
        time.sleep(0.3)  # the shell is waiting on the training step
        job.send_signal(signal.SIGUSR1)
        out, _ = job.communicate(timeout=60)
    finally:  # the stand-in steps too, whatever happened
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    lines = events.read_text().splitlines()
    assert job.returncode == 0, out
    assert "train USR1" in lines, lines
    assert not [ln for ln in lines if ln.startswith(("server USR1", "router USR1"))], lines
    assert not [ln for ln in lines if ln.startswith("scancel")], lines  # no signal to all steps
    stopped = [i for i, ln in enumerate(lines) if ln in ("server TERM", "router TERM")]
    assert stopped and min(stopped) > lines.index("train exit"), lines
    assert "requeue 77" in lines, lines
