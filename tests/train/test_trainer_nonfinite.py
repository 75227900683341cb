"""A non-finite loss skips the update, is counted, and stops the run after
`train.max_nonfinite_in_a_row` in a row, leaving the last good checkpoint intact.

Two levels: `MegatronPolicy.train_step` itself (a NaN step must leave parameters, Adam
state and LR schedule exactly as they were, and leave no residue in the gradient
buffers: the next good step equals a twin policy's that never saw the NaN), and the RL
loop run as `archer train` with NaN advantages injected at chosen steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

POLICY_SCRIPT = r"""
import json, math, os, socket, sys
import torch

torch.set_num_threads(1)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

from transformers import AutoConfig, AutoModelForCausalLM

from archer_mcore.algo.losses import LossConfig
from archer_mcore.config import ArcherRuleConfig
from archer_mcore.actor.policy_batch import with_fields
from archer_mcore.actor.policy_batch import PolicyBatch
from archer_mcore.config import OptimizerConfig
from archer_mcore.actor.policy import MegatronPolicy
from archer_mcore.actor.policy_config import PolicyConfig

out_dir = sys.argv[1]
hf = AutoConfig.for_model("qwen3", vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(hf).save_pretrained(out_dir + "/hf")

cfg = PolicyConfig(
    optimizer=OptimizerConfig(lr=1e-3, clip_grad=1.0, weight_decay=0.0), with_reference=False
)
a = MegatronPolicy.from_hf(out_dir + "/hf", cfg)
b = MegatronPolicy.from_hf(out_dir + "/hf", cfg, init_dist=False)

g = torch.Generator().manual_seed(1)
ids = torch.randint(1, 50, (4, 12), generator=g)
prompt = torch.tensor([3, 4, 2, 5])
mask = torch.arange(8).unsqueeze(0) < torch.tensor([[7], [5], [8], [3]])
batch = PolicyBatch(ids, prompt, mask)
old, _ = a.compute_logprobs(batch)
good = with_fields(batch, old_logp=old, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
poisoned = {
    "nan": torch.tensor([1.0, float("nan"), 0.5, -0.5]),
    "inf": torch.tensor([1.0, -1.0, float("inf"), -0.5]),
}[sys.argv[2]]
bad = with_fields(batch, old_logp=old, advantages=poisoned)
loss_cfg = LossConfig(token_rule=ArcherRuleConfig(), clip_ratio_c=3.0)

def params(p):
    return {k: v.detach().clone() for k, v in p.unwrapped().state_dict().items()
            if isinstance(v, torch.Tensor)}

def adam(p):
    st = []
    for opt in getattr(p.optimizer, "chained_optimizers", [p.optimizer]):
        for s in opt.optimizer.state.values():
            st += [s["exp_avg"].clone(), s["exp_avg_sq"].clone()]
    return st

def same(x, y):
    return all(torch.equal(x[k], y[k]) for k in x) if isinstance(x, dict) else (
        len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)))

res = {}
ma1 = a.train_step(good, loss_cfg)
mb1 = b.train_step(good, loss_cfg)
res["twins_agree_after_first_step"] = same(params(a), params(b))
p0, s0, n0 = params(a), adam(a), a.scheduler.num_steps
m_bad = a.train_step(bad, loss_cfg)
res["bad"] = {k: m_bad[k] for k in ("loss", "grad_norm", "update_skipped")}
res["params_unchanged"] = same(p0, params(a))
res["adam_unchanged"] = same(s0, adam(a))
res["scheduler_unchanged"] = a.scheduler.num_steps == n0
res["first_step_skipped"] = ma1["update_skipped"]
ma2 = a.train_step(good, loss_cfg)
mb2 = b.train_step(good, loss_cfg)
res["good_after_bad"] = {k: ma2[k] for k in ("loss", "grad_norm", "update_skipped")}
res["params_moved"] = not same(p0, params(a))
res["twins_agree_after_good_step"] = same(params(a), params(b))
res["twin_grad_norms"] = [ma2["grad_norm"], mb2["grad_norm"]]
with open(out_dir + "/result.json", "w") as f:
    json.dump(res, f)
"""


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_policy_step_skips_a_nonfinite_update(tmp_path: Path, poison: str) -> None:
    script = tmp_path / "policy_nan.py"
    script.write_text(POLICY_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), poison],
        capture_output=True,
        text=True,
        timeout=220,
        env={**_env(), "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["first_step_skipped"] == 0.0
    assert r["twins_agree_after_first_step"]
    # The poisoned step reports itself and changes nothing.
    assert not math.isfinite(r["bad"]["loss"])
    assert r["bad"]["update_skipped"] == 1.0
    assert r["params_unchanged"] and r["adam_unchanged"] and r["scheduler_unchanged"]
    # The next good step takes effect and equals the step of a twin that never saw the
    # poisoned batch: no NaN gradient was left in the buffers or the optimizer.
    assert r["good_after_bad"]["update_skipped"] == 0.0
    assert math.isfinite(r["good_after_bad"]["loss"])
    assert r["params_moved"]
    assert r["twins_agree_after_good_step"]
    assert r["twin_grad_norms"][0] == r["twin_grad_norms"][1] > 0.0


def _env() -> dict[str, str]:
    import os

    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loop_counts_skipped_updates_and_stops_after_n_in_a_row(archer, helpers, tmp_path):
    # One mini-batch (one optimizer update) per step; every group trained on. NaN
    # advantages at steps 2, 4 and 5 with max_nonfinite_in_a_row = 2: step 2 is skipped
    # (1 in a row), step 3 trains (the count resets), step 4 is skipped (1), step 5 is
    # skipped (2 in a row) and stops the run before its checkpoint.
    out = tmp_path / "run"
    proc = archer.run(
        "train",
        [
            *helpers.FAST,
            "algorithm.group_filter=none",
            "train.steps=6",
            "train.max_nonfinite_in_a_row=2",
            "checkpoint.save_every=1",
            f"train.output_dir={out}",
        ],
        hooks={"nan_steps": [2, 4, 5]},
    )
    assert proc.returncode != 0
    assert "NonFiniteLossError: 2 non-finite updates in a row at step 5" in proc.stderr
    assert "step_00000004" in proc.stderr.split("NonFiniteLossError")[-1]  # the last good one

    rows = {int(r["step"]): r for r in helpers.read_metrics(out)}
    assert sorted(rows) == [1, 2, 3, 4]  # step 5 never finished
    assert [rows[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]
    assert [rows[s]["train/update_skipped"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 1.0]
    assert math.isnan(rows[2]["train/loss"]) and math.isfinite(rows[3]["train/loss"])

    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        "step_00000001",
        "step_00000002",
        "step_00000003",
        "step_00000004",
    ]
    assert (root / "latest").read_text().strip() == "step_00000004"
    from archer_mcore.actor.checkpoint_store import verify_checkpoint

    for s in (1, 2, 3, 4):
        verify_checkpoint(root / f"step_{s:08d}")  # manifest, sizes, CRC32
    state = {s: helpers.checkpoint(root / f"step_{s:08d}") for s in (1, 2, 3, 4)}
    w = {s: helpers.model_weights(state[s]) for s in state}
    assert w[1].keys() == w[4].keys() and len(w[1]) > 5

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert all(torch.isfinite(t).all() for t in w[4].values())
    assert same(w[1], w[2])  # the NaN step 2 left the weights alone
    assert not same(w[2], w[3])  # step 3 trained
    assert same(w[3], w[4])  # and step 4 did not
    # LR schedule: stepped by real updates only; the policy counts every attempt.
    assert [state[s]["common"]["scheduler"]["num_steps"] for s in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert [state[s]["common"]["step"] for s in (1, 2, 3, 4)] == [1, 2, 3, 4]
