"""Fixtures for the trainer tests: `archer` runs in subprocesses with test hooks, and a
reader for the checkpoints they write.

Every run is a real `archer train` / `archer eval` (the CLI's `main`) in a fresh Python
process, started through a small driver that can install two test-only hooks before
the CLI runs (selected by the JSON in $ARCHER_TEST_HOOKS):

- ``nan_steps``: RL steps whose training batch gets one NaN advantage (as a broken
  reward would give), which poisons that step's loss and gradients;
- ``trace``: a JSONL file that receives, for every training rollout call of the
  engine (eval calls use a fixed seed and are left out), the prompts it was given, a
  digest of the tokens it sampled and the weight versions its samples carry;
- ``latency``: LatencyModelEngine keyword arguments (per_token_s, per_call_s): the
  engine's generate calls take that modelled wall time (rollout/latency_engine.py);
- ``accelerator_only_world``: the default process group serves CUDA tensors only, as
  NCCL does on a GPU job (gloo mapped to "cuda" alone: a CPU tensor on it raises "No
  backend type associated with device type cpu", torch 2.13 distributed_c10d), while
  groups made without a backend (megatron's model-parallel groups, whose tensors on a
  GPU are CUDA tensors on NCCL) are gloo over the CPU, where the CPU run keeps them.
  Object collectives and barriers on the default group, which NCCL serves through the
  current CUDA device (torch's `_get_object_coll_device`), run on a gloo group of all
  ranks: what NCCL refuses, CPU tensors in tensor collectives, is refused here too.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

# tests/services.py (shared helpers) importable from these tests
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo_cpu.yaml"

DRIVER = r"""
import hashlib
import json
import os
import sys

hooks = json.loads(os.environ.get("ARCHER_TEST_HOOKS") or "{}")

if hooks.get("nan_steps"):
    import archer_mcore.train.loop as loop

    nan_steps = set(hooks["nan_steps"])
    real_build_batch = loop.build_batch

    def build_batch(*args, **kwargs):
        batch = real_build_batch(*args, **kwargs)
        step = sys._getframe(1).f_locals["step"]  # the RL loop's step variable
        if step in nan_steps:
            batch.policy.advantages[0] = float("nan")
            print(f"test hook: NaN advantage injected at step {step}", flush=True)
        return batch

    loop.build_batch = build_batch

if hooks.get("trace"):
    from archer_mcore.rollout.local_engine import LocalEngine

    trace_path = hooks["trace"]
    real_generate = LocalEngine.generate

    def generate(self, prompts, n, params):
        out = real_generate(self, prompts, n, params)
        if params.seed is None:
            tokens = [s.token_ids for g in out.groups for s in g]
            digest = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()
            rec = {"prompts": [list(map(int, p)) for p in prompts], "responses": digest,
                   "versions": sorted({s.weight_version for g in out.groups for s in g})}
            with open(trace_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return out

    LocalEngine.generate = generate

if hooks.get("latency"):
    import archer_mcore.train.components as components
    from archer_mcore.rollout.latency_engine import LatencyModelEngine

    real_build_engine = components.build_engine

    def build_engine(*args, **kwargs):
        return LatencyModelEngine(inner=real_build_engine(*args, **kwargs), **hooks["latency"])

    components.build_engine = build_engine

if hooks.get("accelerator_only_world"):
    import torch.distributed as dist

    import archer_mcore.parallel.distributed as distributed

    distributed.default_backend = lambda: "cuda:gloo"
    real_new_group = dist.new_group

    def new_group(*args, **kwargs):
        if len(args) < 3 and kwargs.get("backend") is None:
            kwargs["backend"] = "gloo"
        return real_new_group(*args, **kwargs)

    dist.new_group = new_group
    cpu_world = []

    def on_cpu_world(fn):
        def collective(*args, **kwargs):
            if kwargs.get("group") is None:
                if not cpu_world:
                    cpu_world.append(real_new_group(backend="gloo"))
                kwargs["group"] = cpu_world[0]
            return fn(*args, **kwargs)

        return collective

    for name in ("all_gather_object", "broadcast_object_list", "gather_object",
                 "scatter_object_list", "barrier"):
        setattr(dist, name, on_cpu_world(getattr(dist, name)))

from archer_mcore.cli import main

sys.exit(main(sys.argv[1:]))
"""

# Small, fast settings shared by the mechanics tests (not the accuracy test): 8 prompts
# x 8 samples per step in one mini-batch (one optimizer update per step), no eval. A
# 50-step warm start solves few problems, so rewards may all be equal; the entropy
# bonus gives every update a non-zero gradient regardless (these tests are about the
# loop's mechanics, not learning), and lr is pinned so the demo's tuning cannot shrink
# the updates.
FAST = (
    "train.torch_threads=1",
    "algorithm.entropy_coef=0.01",
    "optimizer.lr=5.0e-4",
    "warmstart.steps=50",
    "warmstart.examples=256",  # fewer than the 512 prompts: RL samples the other 256
    "data.synthetic_train_size=512",
    "data.synthetic_eval_size=16",
    "train.prompts_per_step=8",
    "train.mini_batch_prompts=8",
    "rollout.n_samples_per_prompt=8",
    "eval.every=0",
    "checkpoint.keep_last=10",
)


def child_env(hooks: dict[str, Any] | None = None) -> dict[str, str]:
    """The environment of an archer subprocess: no inherited rendezvous settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    env["ARCHER_TEST_HOOKS"] = json.dumps(hooks or {})
    return env


class ArcherRunner:
    """Starts `archer` subprocesses through the hook driver."""

    def __init__(self, driver: Path, cache: Path) -> None:
        self.driver = driver
        self.cache = cache  # shared warm-start / tokenizer / synthetic-data cache

    def command(
        self,
        subcommand: str,
        overrides: Sequence[str],
        *extra: str,
        config: Path = DEMO_CONFIG,
        own_cache: bool = True,
    ) -> list[str]:
        """own_cache False: the config's own warm-start cache directory."""
        cmd = [sys.executable, str(self.driver), subcommand, str(config)]
        cache = [f"warmstart.cache_dir={self.cache}"] if own_cache else []
        for o in (*cache, *overrides):
            cmd += ["-o", o]
        return [*cmd, *extra]

    def popen(
        self,
        subcommand: str,
        overrides: Sequence[str],
        *extra: str,
        hooks: dict[str, Any] | None = None,
        config: Path = DEMO_CONFIG,
        own_cache: bool = True,
    ) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(subcommand, overrides, *extra, config=config, own_cache=own_cache),
            cwd=REPO,
            env=child_env(hooks),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a timeout kills the whole group, nothing is left behind
        )

    def run(
        self,
        subcommand: str,
        overrides: Sequence[str],
        *extra: str,
        hooks: dict[str, Any] | None = None,
        timeout: float = 300.0,
        config: Path = DEMO_CONFIG,
    ) -> subprocess.CompletedProcess:
        proc = self.popen(subcommand, overrides, *extra, hooks=hooks, config=config)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            pytest.fail(f"archer {subcommand} timed out after {timeout}s\n{out}\n{err[-4000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a subprocess started with start_new_session and its children."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def archer(tmp_path_factory: pytest.TempPathFactory) -> ArcherRunner:
    root = tmp_path_factory.mktemp("archer")
    driver = root / "archer_driver.py"
    driver.write_text(DRIVER)
    return ArcherRunner(driver, root / "cache")


def read_metrics(output_dir: Path) -> list[dict[str, float]]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_tensors(step_dir: Path, tmp: Path) -> dict[str, Any]:
    """Everything a checkpoint's megatron dist_checkpointing part holds (model weights,
    optimizer state), read with torch.distributed.checkpoint alone (no megatron), plus
    its common.pt (scheduler state, step)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "dist", out)
    state = torch.load(out, weights_only=False)
    state["common"] = torch.load(step_dir / "dist" / "common.pt", weights_only=False)
    return state


def model_weights(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")
    }


def optimizer_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith("optimizer.")
    }


class Helpers:
    """The module's helpers for the test files (which cannot import this conftest by
    name: every test directory has one)."""

    FAST = FAST
    DEMO_CONFIG = DEMO_CONFIG
    read_metrics = staticmethod(read_metrics)
    model_weights = staticmethod(model_weights)
    optimizer_tensors = staticmethod(optimizer_tensors)
    kill_group = staticmethod(kill_group)
    child_env = staticmethod(child_env)

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp

    def checkpoint(self, step_dir: Path) -> dict[str, Any]:
        return checkpoint_tensors(step_dir, self.tmp)


@pytest.fixture
def helpers(tmp_path: Path) -> Helpers:
    return Helpers(tmp_path)


# The uninterrupted reference run (5 steps, every group trained on, eval at the end),
# shared by the resume test (same prompts and final weights) and the eval CLI test
# (`archer eval` on its checkpoint reproduces the in-training eval).
REFERENCE_STEPS = 5
REFERENCE = (
    *FAST,
    "algorithm.group_filter=none",
    f"train.steps={REFERENCE_STEPS}",
    "checkpoint.save_every=0",
    f"eval.every={REFERENCE_STEPS}",
)


@pytest.fixture(scope="session")
def reference_run(archer: ArcherRunner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output directory of the reference run; its trace is out/trace.jsonl."""
    out = tmp_path_factory.mktemp("reference")
    proc = archer.run(
        "train",
        [*REFERENCE, f"train.output_dir={out}"],
        hooks={"trace": str(out / "trace.jsonl")},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


Helpers.REFERENCE = REFERENCE
Helpers.REFERENCE_STEPS = REFERENCE_STEPS
