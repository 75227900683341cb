"""Training a Qwen3-MoE (issue 23 item 3) on 2 gloo processes: one RL step at EP 2
equals the step at EP 1 and the same step taken with transformers' Qwen3MoeForCausalLM +
the torch loss reference + torch Adam (loss, grad norm, weights after the step, to
1e-5); a checkpoint saved at EP 2 resumes at EP 1, TP 2 and PP 2 and trains on to the
weights of the run that never changed layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import moe_train_workers
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from safetensors.torch import save_file
from test_moe import save_tiny_moe
from test_train_step import LOSS, OPTIM, TEMPERATURE, _batch, reference_step


def per_expert(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5.25's in-memory state dict under checkpoint names: each fused
    ``mlp.experts.gate_up_proj`` [E, 2f, h] / ``down_proj`` [E, h, f] split into
    ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (what save_pretrained writes)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = v[e, :f].contiguous()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = v[e, f:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e].contiguous()
        else:
            out[k] = v
    return out


def _spawn(task: str, payload: dict[str, Any], tmp: Path) -> dict[str, Any]:
    result = tmp / f"{task}_result.json"
    mp.start_processes(
        moe_train_workers.entry,
        args=(2, free_port(), task, payload, str(result)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_step_at_ep2_equals_ep1_and_transformers(tmp_path: Path) -> None:
    hf_dir = save_tiny_moe(tmp_path / "hf", seed=7)
    b = _batch(100)
    old, adv, ref_loss, ref_norm, fused = reference_step(hf_dir, b)
    expected = per_expert(fused)
    assert len(expected) == len(fused) + 2 * (3 * 4 - 2)  # 2 layers, 4 experts
    save_file(expected, str(tmp_path / "expected.safetensors"))
    payload = {
        "hf_dir": str(hf_dir),
        "expected": str(tmp_path / "expected.safetensors"),
        "batch": {
            **{k: v.tolist() for k, v in b.items()},
            "old_logp": old.tolist(),
            "advantages": adv.tolist(),
        },
        "loss": LOSS,
        "optim": OPTIM,
        "eps": [1, 2],
    }
    assert TEMPERATURE == 0.9  # the workers' policy samples at 0.9 too
    res = _spawn("moe_step", payload, tmp_path)
    assert ref_norm > OPTIM["clip_grad"]  # clipping is active in this step
    ep1, ep2 = res["ep1"], res["ep2"]
    assert (ep1["local_experts"], ep2["local_experts"]) == (4, 2)  # EP 2 splits the experts
    assert ep1["dp"] == ep2["dp"] == 2
    for name, r in res.items():
        assert r["names"] == len(expected), (name, r)
        assert r["vs_reference"] < 1e-5, (name, r)
        assert abs(r["metrics"]["loss"] - ref_loss) < 1e-5, (name, r["metrics"], ref_loss)
        assert abs(r["metrics"]["grad_norm"] - ref_norm) < 1e-5 * max(1.0, ref_norm), (name, r)
    assert ep2["vs_first"] < 1e-5, ep2
    assert abs(ep2["metrics"]["loss"] - ep1["metrics"]["loss"]) < 1e-5
    assert abs(ep2["metrics"]["grad_norm"] - ep1["metrics"]["grad_norm"]) < 1e-5


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_checkpoint_saved_at_ep2_resumes_at_ep1_tp2_pp2(tmp_path: Path) -> None:
    hf_dir = save_tiny_moe(tmp_path / "hf", seed=4)
    out = _spawn(
        "moe_reshard",
        {
            "hf_dir": str(hf_dir),
            "root": str(tmp_path / "ckpt"),
            "optim": {
                "lr": 1e-2,
                "lr_warmup_steps": 1,
                "lr_schedule": "cosine",
                "clip_grad": 1.0,
                "weight_decay": 0.01,
            },
            "save_layout": [1, 1, 2],
            "resume_layouts": [[1, 1, 1], [2, 1, 1], [1, 2, 1], [1, 1, 2]],
        },
        tmp_path,
    )
    assert out["moved"] > 1e-3  # training moved the weights: the comparison can fail
    manifest = json.loads((tmp_path / "ckpt" / "step_00000002" / "MANIFEST.json").read_text())
    assert (manifest["tp"], manifest["pp"], manifest["ep"]) == (1, 1, 2)
    assert set(out["resumed"]) == {"tp1pp1ep1", "tp2pp1ep1", "tp1pp2ep1", "tp1pp1ep2"}
    for name, r in out["resumed"].items():
        assert r["loaded_diff"] == 0.0, (name, r)  # the weights as saved, exactly
        assert r["step"] == 4, (name, r)
        assert r["max_abs_diff"] < 1e-5, (name, r)
