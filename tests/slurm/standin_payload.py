"""STAND-IN training payload, for the Slurm time-limit test only (why: the docstring of
tests/slurm/test_slurm_live.py): the trainer's contract, tiny work.

Run by the sbatch scripts as `torchrun ... standin_payload.py CONFIG --resume -o k=v ...`.
Like the trainer it: loads the archer config (with the overrides), joins the gloo
process group torchrun set up, resumes from `train.output_dir/checkpoint.json`, runs
`train.steps` steps (each an all_reduce over all ranks plus $STANDIN_STEP_SECONDS of
sleep), records metrics on rank 0 through MetricsExporter (pushed to
metrics.pushgateway, grouped by $SLURM_JOB_ID), and on SIGUSR1/SIGTERM agrees with the
other ranks on a stop step, writes a checkpoint and exits 0.

Every line it prints starts with "payload rank=<r>" so the tests can read the job log.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from archer_mcore.config import load_config
from archer_mcore.metrics.exporter import MetricsExporter

STOP = {"signal": ""}


def _on_signal(signum: int, _frame: object) -> None:
    STOP["signal"] = signal.Signals(signum).name


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.override)
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, _on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    node = os.environ.get("SLURMD_NODENAME", "?")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))

    def say(msg: str) -> None:
        print(f"payload rank={rank} node={node} restart={restart} {msg}", flush=True)

    # all_reduce check: sum over ranks of (rank + 1) = world * (world + 1) / 2
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    ok = t.item() == world * (world + 1) / 2
    say(f"world={world} all_reduce={t.item():g} ok={ok}")
    if not ok:
        return 3

    out = Path(cfg.train.output_dir)
    ckpt = out / "checkpoint.json"
    start = 0
    if args.resume and ckpt.exists():
        start = int(json.loads(ckpt.read_text())["next_step"])
        say(f"resumed from step {start}")
    exporter = None
    if rank == 0:
        exporter = MetricsExporter(
            run=cfg.train.run_name, job=cfg.metrics.job, pushgateway=cfg.metrics.pushgateway or None
        )
    step_s = float(os.environ.get("STANDIN_STEP_SECONDS", "0.2"))
    step = start
    while step < cfg.train.steps:
        t = torch.ones(1)
        dist.all_reduce(t)
        time.sleep(step_s)
        say(f"step {step}")
        if exporter is not None:
            exporter.record_step(
                step, {"reward/mean": 0.1 * step, "time/step": step_s, "train/loss": 0.5}
            )
        step += 1
        # a stop request reaches the ranks at different moments: agree on it
        flag = torch.tensor([1.0 if STOP["signal"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and step < cfg.train.steps:
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                ckpt.write_text(json.dumps({"next_step": step}))
            dist.barrier()
            say(f"checkpoint saved at step {step} on {STOP['signal'] or 'peer request'}")
            if exporter is not None:
                exporter.close(delete_push_group=False)
            dist.destroy_process_group()
            return 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps({"final_step": step, "world": world}))
    say(f"finished at step {step}")
    if exporter is not None:
        exporter.close(delete_push_group=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
