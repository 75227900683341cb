"""Two CPU steps of `archer train` with an inline tiny Qwen3-MoE (`model.arch.family:
qwen3_moe`, issue 23) and the local engine: the run completes, every synced tensor
reaches the engine's fused experts (sync bytes = transformers' parameter bytes), and
the engine's log-probs equal the trainer's after the update was synced (the rollout
mismatch metric stays at float32 noise while the weights moved). Under torchrun with two
ranks at parallel.expert_model_parallel_size 2 (each rank holds 2 of the 4 experts) the
first step's loss and grad norm equal those at EP 1 on the same two ranks, and the
experts gathered over the EP group reach the engine whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

MOE = (
    "model.arch.family=qwen3_moe",
    "model.arch.num_experts=4",
    "model.arch.num_experts_per_tok=2",
    "model.arch.moe_intermediate_size=32",
    "model.arch.tie_word_embeddings=false",
    "warmstart.steps=0",
    "train.torch_threads=1",
    "train.steps=2",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=4",
    "rollout.n_samples_per_prompt=4",
    "rollout.max_new_tokens=16",
    "eval.every=0",
    "data.synthetic_train_size=64",
    "data.synthetic_eval_size=8",
    # rewards of a random model are all equal: the entropy bonus makes every update move
    "algorithm.entropy_coef=0.01",
    "algorithm.group_filter=none",
    "checkpoint.save_every=2",
)


@pytest.mark.timeout(180)
def test_two_steps_of_a_tiny_moe_train_and_sync(archer: Any, helpers: Any, tmp_path: Path) -> None:

    from transformers import AutoConfig, AutoModelForCausalLM

    from archer_mcore.config import load_config
    from archer_mcore.model.hf_config import model_hf_config

    out = tmp_path / "run"
    proc = archer.run("train", [*MOE, f"train.output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = helpers.read_metrics(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml", MOE)
    hf = AutoConfig.for_model(**model_hf_config(cfg.model))
    assert hf.model_type == "qwen3_moe" and hf.num_experts == 4
    numel = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf).parameters())
    for r in rows:
        assert r["sync/bytes"] == 4 * numel  # float32: every parameter, experts included
        assert r["train/update_skipped"] == 0.0
        assert r["rollout/logprob_abs_diff"] < 1e-5, r["rollout/logprob_abs_diff"]
    assert rows[1]["kl/all"] > 0  # step 1's update moved the policy from the reference
    assert (out / "checkpoints" / "step_00000002").is_dir()


def _torchrun(archer: Any, helpers: Any, out: Path, ep: int) -> list[dict[str, float]]:
    cmd = archer.command("train", [*MOE, f"train.output_dir={out}",
                                   f"parallel.expert_model_parallel_size={ep}"])  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]  # fmt: skip
    proc = subprocess.run([*torchrun, *cmd[1:]], cwd=REPO, env=helpers.child_env(), capture_output=True,
                          text=True, timeout=300, start_new_session=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return helpers.read_metrics(out)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_ranks_at_ep2_train_as_at_ep1(archer: Any, helpers: Any, tmp_path: Path) -> None:
    ep1 = _torchrun(archer, helpers, tmp_path / "ep1", 1)
    ep2 = _torchrun(archer, helpers, tmp_path / "ep2", 2)
    assert [int(r["step"]) for r in ep2] == [1, 2]
    a, b = ep1[0], ep2[0]  # the same rollout (same seed, same weights): the same step
    for key in ("train/loss", "train/grad_norm", "entropy/all"):
        assert abs(a[key] - b[key]) < 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])
    for r in ep2:
        assert r["sync/bytes"] == ep1[0]["sync/bytes"]  # every expert, from both EP ranks
        assert r["rollout/logprob_abs_diff"] < 1e-5, r["rollout/logprob_abs_diff"]
    manifest = json.loads(
        (tmp_path / "ep2" / "checkpoints" / "step_00000002" / "MANIFEST.json").read_text()
    )
    assert (manifest["ep"], manifest["world_size"]) == (2, 2)
