#!/usr/bin/env python
"""Rank 0's rollout to every rank: one pickle (`broadcast_object_list`) against token
arrays (`ranks.broadcast_rollout`, parallel/batch_transport.py), side by side in one run.

The batch has the 32B presets' shape (configs/qwen3_32b_archer.yaml:
train.prompts_per_step 512 x rollout.n_samples_per_prompt 16, rollout.max_new_tokens
20,480, data.max_prompt_length 2,048), scaled by --fraction (prompts only: the length
mix is the full one). Lengths follow the planner's mix (plan/specs.py Assumptions):
responses lognormal with mean max_new_tokens / 2 and log-sd 0.8, capped at
max_new_tokens; prompts lognormal with mean 256 and log-sd 0.8, capped at
max_prompt_length, each sample with its own copy (as SGLangEngine builds them). Token
ids are Zipf(1.2) ranks modulo Qwen3's 151,936 (mostly small ids, as text is: pickle's
short int codes favour the old path); log-probs are float32 values (as both engines
give) of -Exp(0.3); each group has 16 0/1 verdicts, a data source, and each sample a
32-character request id. The groups are `ScoredGroup`s in a `SamplingOutcome` (what
the async path sends; the sync path sends the list).

Two gloo processes on this machine, over the control group (`ranks.control_group`),
alternate old and new --repeats times. Reported per way: bytes broadcast (pickle +
its size tensor; arrays + index + header + metadata pickle), rank 0's time (pickling /
encoding + sends), the end-to-end time (both ranks start at a barrier; the end is the
later rank's return, the receiver's unpickling / list rebuilding included), medians
and (in brackets) the fastest repeat, each rank's CPU time (process_time, gloo's
threads included: less disturbed than wall time on a shared machine), and the peak rise of each rank's resident memory during the call (sampled every 2 ms). The
receiver's object is checked against rank 0's (same pickle bytes) once per way.

Usage:
    python benchmarks/batch_broadcast.py                     # 1/8 of the batch, 3 repeats
    python benchmarks/batch_broadcast.py --fraction 0.25 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import pickle
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = REPO / "configs" / "qwen3_32b_archer.yaml"
VOCAB = 151_936  # Qwen3
MEAN_PROMPT, LOG_SD = 256, 0.8  # plan/specs.py Assumptions


def preset_shape() -> dict[str, int]:
    import yaml

    cfg = yaml.safe_load(PRESET.read_text())
    return {
        "prompts": int(cfg["train"]["prompts_per_step"]),
        "n": int(cfg["rollout"]["n_samples_per_prompt"]),
        "max_new_tokens": int(cfg["rollout"]["max_new_tokens"]),
        "max_prompt": int(cfg["data"]["max_prompt_length"]),
    }


def _lognormal(rng: Any, mean: float, cap: int, size: int) -> Any:
    import numpy as np

    mu = math.log(mean) - LOG_SD**2 / 2
    return np.minimum(np.maximum(rng.lognormal(mu, LOG_SD, size).astype(np.int64), 1), cap)


def make_outcome(prompts: int, n: int, max_new: int, max_prompt: int, seed: int) -> Any:
    """Rank 0's SamplingOutcome of `prompts` scored groups of `n` samples."""
    import numpy as np

    from archer_mcore.rollout.types import Sample
    from archer_mcore.train.advantage_batch import ScoredGroup
    from archer_mcore.train.dynamic_sampling import SamplingOutcome

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(prompts):
        plen = int(_lognormal(rng, MEAN_PROMPT, max_prompt, 1)[0])
        prompt = ((rng.zipf(1.2, plen) - 1) % VOCAB).tolist()
        lengths = _lognormal(rng, max_new / 2, max_new, n)
        samples = []
        for j, length in enumerate(lengths.tolist()):
            ids = ((rng.zipf(1.2, length) - 1) % VOCAB).tolist()
            lps = (-rng.exponential(0.3, length)).astype(np.float32).tolist()
            reason = "length" if length == max_new else "stop"
            sample = Sample(
                prompt_index=g,
                sample_index=j,
                prompt_ids=list(prompt),
                token_ids=ids,
                logprobs=lps,
                finish_reason=reason,
                weight_version=3,
                request_id=rng.bytes(16).hex(),
            )
            samples.append(sample)
        correct = rng.integers(0, 2, n).astype(float).tolist()
        groups.append(ScoredGroup(samples, correct, data_source="math_dapo"))
    return SamplingOutcome(
        groups=groups,
        generation_batches=1,
        generated_groups=prompts,
        dropped_groups=0,
        full=True,
        all_groups=list(groups),
    )


class PeakRSS:
    """The peak rise of this process's resident memory while in the block."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.rise = self.peak - self.base


def _digest(obj: Any) -> str:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()


def worker(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _pickler

    from archer_mcore.parallel import batch_transport, ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ranks.init_control_group(3600.0)
    group = ranks.control_group()
    shape = args.shape
    obj = None
    info: dict[str, Any] = {}
    if rank == 0:
        t = time.perf_counter()
        obj = make_outcome(shape["prompts_run"], shape["n"], shape["max_new_tokens"],
                           shape["max_prompt"], args.seed)  # fmt: skip
        info["build_s"] = time.perf_counter() - t
        samples = [s for g in obj.groups for s in g.samples]
        info["response_tokens"] = sum(len(s.token_ids) for s in samples)
        info["prompt_tokens"] = sum(len(s.prompt_ids) for s in samples)
        import io

        buf = io.BytesIO()
        _pickler(buf).dump(obj)  # what broadcast_object_list sends, + its int64 size
        info["bytes"] = {"old": buf.getbuffer().nbytes + 8,
                         "new": batch_transport.wire_bytes(obj)}  # fmt: skip
        del buf
        info["digest"] = _digest(obj)
    ways = {"old": ranks.broadcast_object, "new": ranks.broadcast_rollout}
    digest = [info.get("digest")]
    dist.broadcast_object_list(digest, src=0, group=group)
    rows: list[dict[str, Any]] = []
    checked: dict[str, bool] = {}
    for rep in range(args.repeats):
        order = ["old", "new"] if rep % 2 == 0 else ["new", "old"]
        for way in order:
            gc.collect()
            dist.barrier(group=group)
            with PeakRSS() as mem:
                t, cpu = time.perf_counter(), time.process_time()
                got = ways[way](obj if rank == 0 else None)
                elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
            if rank == 1 and way not in checked:
                checked[way] = _digest(got) == digest[0]
            del got
            rows.append({"rep": rep, "way": way, "rank": rank, "s": elapsed, "cpu_s": cpu,
                         "rss_rise": mem.rise})  # fmt: skip
    gathered: list[Any] = [None, None]
    dist.all_gather_object(gathered, {"rows": rows, "checked": checked, "info": info},
                           group=group)  # fmt: skip
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    ranks.destroy_control_group()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarise(gathered: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    info = gathered[0]["info"]
    rows = gathered[0]["rows"] + gathered[1]["rows"]
    res: dict[str, Any] = {"shape": args.shape, "fraction": args.fraction,
                           "repeats": args.repeats, "info": {k: v for k, v in info.items()
                                                             if k != "digest"},
                           "equal_on_rank_1": gathered[1]["checked"]}  # fmt: skip
    for way in ("old", "new"):
        mine = [r for r in rows if r["way"] == way]
        e2e = [max(r["s"] for r in mine if r["rep"] == rep) for rep in range(args.repeats)]
        r0 = [r["s"] for r in mine if r["rank"] == 0]
        res[way] = {
            "bytes": info["bytes"][way],
            "rank0_s": statistics.median(r0),
            "end_to_end_s": statistics.median(e2e),
            "end_to_end_min_s": min(e2e),
            "cpu_s_rank0": statistics.median(r["cpu_s"] for r in mine if r["rank"] == 0),
            "cpu_s_rank1": statistics.median(r["cpu_s"] for r in mine if r["rank"] == 1),
            "rss_rise_rank0": max(r["rss_rise"] for r in mine if r["rank"] == 0),
            "rss_rise_rank1": max(r["rss_rise"] for r in mine if r["rank"] == 1),
        }
    return res


def markdown(res: dict[str, Any], command: str) -> str:
    sh, info, old, new = res["shape"], res["info"], res["old"], res["new"]
    tokens = info["response_tokens"] + info["prompt_tokens"]
    mib = 2.0**20
    lines = [
        f"`{command}` ({platform.machine()}, {os.cpu_count()} CPUs, torch gloo, 2 processes)",
        "",
        f"Batch: {sh['prompts_run']} prompts x {sh['n']} samples ({res['fraction']:g} of the "
        f"preset's {sh['prompts']}), {info['response_tokens']:,} response tokens (mean "
        f"{info['response_tokens'] / (sh['prompts_run'] * sh['n']):,.0f}), "
        f"{info['prompt_tokens']:,} prompt tokens; median of {res['repeats']} alternated "
        f"repeats. Received object equal to rank 0's: {res['equal_on_rank_1']}.",
        "",
        "| way | bytes broadcast | bytes / token | rank 0 s | end-to-end s (min) "
        "| CPU s rank 0 / rank 1 | peak RSS rise rank 0 / rank 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in (("pickle (`broadcast_object`)", old), ("arrays (`broadcast_rollout`)", new)):
        lines.append(
            f"| {name} | {r['bytes'] / mib:,.1f} MiB | {r['bytes'] / tokens:.2f} "
            f"| {r['rank0_s']:.2f} | {r['end_to_end_s']:.2f} ({r['end_to_end_min_s']:.2f}) "
            f"| {r['cpu_s_rank0']:.2f} / {r['cpu_s_rank1']:.2f} | {r['rss_rise_rank0'] / mib:,.0f} / {r['rss_rise_rank1'] / mib:,.0f} MiB |"
        )
    lines.append(
        f"| new / old | {new['bytes'] / old['bytes']:.2f}x | | "
        f"{new['rank0_s'] / old['rank0_s']:.2f}x | {new['end_to_end_s'] / old['end_to_end_s']:.2f}x "
        f"({new['end_to_end_min_s'] / old['end_to_end_min_s']:.2f}x) | "
        f"{new['cpu_s_rank0'] / old['cpu_s_rank0']:.2f}x / "
        f"{new['cpu_s_rank1'] / old['cpu_s_rank1']:.2f}x | "
        f"{new['rss_rise_rank0'] / max(1, old['rss_rise_rank0']):.2f}x / "
        f"{new['rss_rise_rank1'] / max(1, old['rss_rise_rank1']):.2f}x |"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=float, default=0.125,
                   help="share of the preset's prompts per step to send (default 1/8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results as JSON here")
    args = p.parse_args()
    import torch.multiprocessing as mp

    shape = preset_shape()
    shape["prompts_run"] = max(1, round(shape["prompts"] * args.fraction))
    args.shape = shape
    out = f"/tmp/archer_batch_broadcast.{os.getpid()}.json"
    mp.start_processes(worker, args=(_free_port(), args, out), nprocs=2, start_method="spawn")
    with open(out) as f:
        gathered = json.load(f)
    os.unlink(out)
    res = summarise(gathered, args)
    print(markdown(res, "python benchmarks/batch_broadcast.py " + " ".join(sys.argv[1:])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
