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


def hf_router_load(hf_dir: Path, b: dict[str, torch.Tensor]) -> dict[int, float]:
    """Per layer (1-based): the most loaded expert's tokens / the mean over experts, from
    transformers' router logits (top-k) over each row's prompt and response tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    counts = torch.zeros(model.config.num_hidden_layers, e)
    lengths = (
        b["prompt_lengths"]
        + b["response_mask"].shape[1]
        - b["response_mask"].flip(1).int().argmax(1)
    )
    for i, n in enumerate(lengths.tolist()):
        with torch.no_grad():
            out = model(input_ids=b["input_ids"][i : i + 1, :n], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            top = logits.reshape(n, e).topk(k, dim=-1).indices
            counts[layer] += torch.bincount(top.flatten(), minlength=e).float()
    return {j + 1: float(c.max() / c.mean()) for j, c in enumerate(counts)}


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
    # router load (issue 23 item 7): each MoE layer's max/mean expert load over the
    # step's training forward equals the one of transformers' own router on the same
    # tokens (its top-k of the router logits), at EP 1 and EP 2; nothing dropped
    want = hf_router_load(hf_dir, b)
    assert len(want) == 2 and max(want.values()) > 1.0  # unbalanced: the check can fail
    for name, r in res.items():
        m = r["metrics"]
        for layer, ratio in want.items():
            # float32 on the way back; one token more or less moves it by > 1e-2
            assert abs(m[f"moe/layer/{layer}/load_max_over_mean"] - ratio) < 1e-6, (name, m)
        assert m["moe/load_max_over_mean"] == max(m[f"moe/layer/{n}/load_max_over_mean"]
                                                  for n in want)  # fmt: skip
        assert m["moe/tokens_dropped_fraction"] == 0.0
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
