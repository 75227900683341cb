"""Step time and idle shares with rollout.async_steps 0 and 1, side by side in one run.

The real trainer (`archer_mcore.train.loop.train`) on the CPU demo's model and config
(configs/demo_cpu.yaml: 32 prompts x 8 samples per step, Archer loss) runs against a
`LatencyModelEngine` (archer_mcore/rollout/latency_engine.py) whose generate call
sleeps per_call_s + per_token_s x tokens on the calling thread and synthesises the
tokens, so generation uses no CPU and its time is set exactly. First a calibration run
(generation ~ free) measures the trainer's own time per step T_train; then, for each
ratio r of generation time to training time, per_token_s is chosen so that one
generation batch takes about r x T_train, and the synchronous and the async loop run
with it, one after the other. Each run is a fresh process (torch.distributed state).

    python benchmarks/async_rollout.py                    # ratios 0.5, 1, 2; 6 steps
    python benchmarks/async_rollout.py --ratios 1 --steps 4

Reported per run (means over steps 2 .. steps-1: step 1 waits for its batch in both
modes and the last step writes a checkpoint): step time, the trainer's idle share
(`overlap/trainer_idle_fraction`), the rollout side's idle share, the share of the
rollout work overlapped with training (`overlap/fraction`), and sync / async step time.
With equal sides (r = 1) the async step should approach half the synchronous one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
OVERRIDES = (
    "warmstart.steps=0",  # timing only: a random-init policy trains as fast as a tuned one
    "eval.every=0",
    "checkpoint.save_every=0",
    "algorithm.group_filter=none",  # synthetic tokens are all wrong: keep every group
    "rollout.tis_cap=2.0",
    "metrics.enabled=false",
)


def child(spec: dict[str, Any]) -> None:
    """One training run in this process; prints its per-step metrics as one JSON line."""
    import torch

    from archer_mcore.config import load_config
    from archer_mcore.rollout.latency_engine import LatencyModelEngine
    from archer_mcore.train.components import build_components
    from archer_mcore.train.loop import train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    cfg = load_config(DEMO, [*OVERRIDES, *spec["overrides"]])
    torch.set_num_threads(cfg.train.torch_threads)
    c = build_components(cfg)
    c.engine.shutdown()
    c.engine = LatencyModelEngine(spec["per_token_s"], spec["per_call_s"],
                                  vocab_size=cfg.model.arch.vocab_size, seed=cfg.train.seed)  # fmt: skip
    train(cfg, components=c)
    print("RESULT " + json.dumps(c.history), flush=True)


def run(name: str, out: Path, steps: int, async_steps: int, per_token_s: float,
        per_call_s: float) -> list[dict[str, float]]:  # fmt: skip
    extra = ["rollout.mode=disaggregated", "rollout.async_steps=1"] if async_steps else []
    spec = {
        "overrides": [f"train.output_dir={out / name}", f"train.steps={steps}",
                      f"warmstart.cache_dir={out / 'cache'}", *extra],
        "per_token_s": per_token_s,
        "per_call_s": per_call_s,
    }  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=REPO, timeout=3600)  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"run {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    mid = rows[1:-1] or rows
    keys = ("time/step", "time/rollout", "overlap/trainer_idle_fraction",
            "overlap/rollout_idle_fraction", "overlap/fraction", "rollout/staleness_max")  # fmt: skip
    return {k: sum(r.get(k, 0.0) for r in mid) / len(mid) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ratios", default="0.5,1,2", help="generation time / training time")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default="/tmp/archer_async_bench")
    p.add_argument("--json", default="", help="also write the table as JSON here")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    out = Path(args.out)
    cal = summarise(run("calibrate", out, args.steps, 0, 0.0, 0.0))
    t_train = cal["time/step"] - cal["time/rollout"]  # includes scoring of the free batch
    cfg_tokens = 32 * 8 * (48 // 2 + 48) / 2  # prompts x n x mean synthetic length
    print(f"calibration: trainer {t_train:.2f} s per step (generation free)", flush=True)
    table = []
    for r in (float(x) for x in args.ratios.split(",")):
        per_token = r * t_train / cfg_tokens
        res = {m: summarise(run(f"r{r}_{m}", out, args.steps, a, per_token, 0.0))
               for m, a in (("sync", 0), ("async", 1))}  # fmt: skip
        table.append({"ratio": r, "per_token_s": per_token, **{f"{m}/{k}": v for m, d in res.items()
                                                             for k, v in d.items()}})  # fmt: skip
    print("\n| gen/train | step sync (s) | step async (s) | async/sync | trainer idle sync / async "
          "| rollout idle sync / async | overlap async | staleness max async |")
    print("|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['ratio']:.1f} | {t['sync/time/step']:.2f} | {t['async/time/step']:.2f} | "
              f"{t['async/time/step'] / t['sync/time/step']:.2f} | "
              f"{t['sync/overlap/trainer_idle_fraction']:.2f} / "
              f"{t['async/overlap/trainer_idle_fraction']:.2f} | "
              f"{t['sync/overlap/rollout_idle_fraction']:.2f} / "
              f"{t['async/overlap/rollout_idle_fraction']:.2f} | {t['async/overlap/fraction']:.2f} | "
              f"{t['async/rollout/staleness_max']:.0f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"t_train_s": t_train, "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
