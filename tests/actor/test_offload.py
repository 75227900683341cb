"""Colocated offload (issue 21, item 3): the trainer's optimizer state, fp32 main
params and gradient buffers leave the device while the SGLang servers generate and
come back before training.

On a real megatron-core policy (tiny Qwen3, bf16 parameters so that the distributed
optimizer keeps fp32 main params; one gloo process on CPU, as the other policy tests):
the round trip is bit-exact and keeps every tensor object, the storages are really
released while offloaded, a checkpoint can be written while offloaded, and optimizer
steps after round trips equal a twin policy's that never offloaded. At the hand-over
points of `Components`: offload before the engine takes memory back, reload after it
released its memory, with the engine's calls recorded by a fake engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

POLICY_SCRIPT = r"""
import json, os, socket, sys
import torch

torch.set_num_threads(1)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

from transformers import AutoConfig, AutoModelForCausalLM

from archer_mcore.actor.offload import TrainerOffload, grad_buffers, optimizer_tensors
from archer_mcore.actor.policy import MegatronPolicy
from archer_mcore.actor.policy_batch import PolicyBatch, with_fields
from archer_mcore.actor.policy_config import PolicyConfig
from archer_mcore.algo.losses import LossConfig
from archer_mcore.config import ArcherRuleConfig, ModelConfig, OptimizerConfig

out_dir = sys.argv[1]
hf = AutoConfig.for_model("qwen3", vocab_size=50, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, max_position_embeddings=64, tie_word_embeddings=False)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(hf).save_pretrained(out_dir + "/hf")

cfg = PolicyConfig(model=ModelConfig(params_dtype="bfloat16"),
                   optimizer=OptimizerConfig(lr=1e-2, clip_grad=1.0, weight_decay=0.01),
                   with_reference=False)
a = MegatronPolicy.from_hf(out_dir + "/hf", cfg)
b = MegatronPolicy.from_hf(out_dir + "/hf", cfg, init_dist=False)

loss_cfg = LossConfig(token_rule=ArcherRuleConfig(), clip_ratio_c=3.0)

def batch(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (4, 12), generator=g)
    mask = torch.arange(8).unsqueeze(0) < torch.tensor([[7], [5], [8], [3]])
    base = PolicyBatch(ids, torch.tensor([3, 4, 2, 5]), mask)
    old, _ = a.compute_logprobs(base)
    return with_fields(base, old_logp=old, advantages=torch.randn(4, generator=g))

def opt_tensors(p):
    return optimizer_tensors(p.optimizer, set())

def grads(p):
    return [buf.grad_data for buf in grad_buffers(p.model)]

def params(p):
    return {k: v.detach().clone() for k, v in p.unwrapped().state_dict().items()
            if isinstance(v, torch.Tensor)}

def same(x, y):
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    return len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))

res = {}
b1 = batch(1)
for p in (a, b):
    p.train_step(b1, loss_cfg)
inner = a.optimizer.chained_optimizers[0] if hasattr(a.optimizer, "chained_optimizers") else a.optimizer
mains = [m for g in inner.shard_fp32_from_float16_groups for m in g]
res["main_params"] = len(mains)
res["main_params_fp32"] = all(m.dtype == torch.float32 for m in mains)
res["optimizer_params"] = sum(len(g["params"]) for g in inner.optimizer.param_groups)
before = opt_tensors(a)
res["moments"] = sum(1 for t in before if t.dim() > 0) - len(mains)
snap_opt = [t.detach().clone() for t in before]
snap_grad = [g.detach().clone() for g in grads(a)]
res["grads_nonzero"] = any(bool(g.abs().sum() > 0) for g in snap_grad)
ptrs = [t.data_ptr() for t in before]
views = [(q, q.main_grad.data_ptr()) for q in a.unwrapped().parameters()]

off = TrainerOffload(model=a.model, optimizer=a.optimizer, copy_grads=True)
counts = off.offload()
res["counts"] = [counts.optimizer_bytes, counts.grad_bytes]
res["expected_bytes"] = [sum(t.numel() * t.element_size() for t in before),
                         sum(g.numel() * g.element_size() for g in snap_grad)]
res["same_objects_offloaded"] = [id(t) for t in opt_tensors(a)] == [id(t) for t in before]
res["moved_to_host_buffers"] = all(
    t.data_ptr() == off._host[id(t)].data_ptr() and t.data_ptr() != p0
    for t, p0 in zip(before, ptrs))
res["grad_storage_bytes_offloaded"] = [g.untyped_storage().nbytes() for g in grads(a)]
res["main_grad_views_released"] = all(q.main_grad.untyped_storage().nbytes() == 0
                                      for q, _ in views)
res["second_offload_is_noop"] = off.offload().optimizer_bytes == 0
# a checkpoint while offloaded (the loop saves after handing the devices to rollout)
ckpt = a.save_checkpoint(out_dir + "/ckpt", {"step": 1}, keep_last=1, step=1)
res["checkpoint_written"] = os.path.isdir(str(ckpt))
off.reload()
res["same_objects_reloaded"] = [id(t) for t in opt_tensors(a)] == [id(t) for t in before]
res["optimizer_bit_exact"] = same(snap_opt, opt_tensors(a))
res["grads_bit_exact"] = same(snap_grad, grads(a))
buffer_storages = {g.untyped_storage().data_ptr() for g in grads(a)}
res["main_grad_views_kept"] = all(
    q.main_grad.untyped_storage().data_ptr() in buffer_storages
    and q.main_grad.untyped_storage().nbytes() > 0 for q, _ in views)
res["reload_twice_is_noop"] = (off.reload() is None) and not off.offloaded

# step 2: a after the round trip, b without one
b2 = batch(2)
for p in (a, b):
    p.train_step(b2, loss_cfg)
res["step2_params_equal"] = same(params(a), params(b))
res["step2_optimizer_equal"] = same(opt_tensors(a), opt_tensors(b))
# the default: gradients are dropped, not copied; they come back as zeros
off2 = TrainerOffload(model=a.model, optimizer=a.optimizer)
off2.offload()
off2.reload()
res["default_grads_zero"] = all(bool((g == 0).all()) for g in grads(a))
res["default_optimizer_equal"] = same(opt_tensors(a), opt_tensors(b))
b3 = batch(3)
ma, mb = (p.train_step(b3, loss_cfg) for p in (a, b))
res["step3_params_equal"] = same(params(a), params(b))
res["step3_optimizer_equal"] = same(opt_tensors(a), opt_tensors(b))
res["step3_grad_norms"] = [ma["grad_norm"], mb["grad_norm"]]
# the checkpoint written while offloaded holds the step-1 state that was offloaded
b.load_checkpoint(ckpt)
res["offloaded_checkpoint_loads_back"] = same(snap_opt, opt_tensors(b))
with open(out_dir + "/result.json", "w") as f:
    json.dump(res, f)
"""


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONWARNINGS": "ignore"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offload_round_trip_on_a_megatron_policy(tmp_path: Path) -> None:
    script = tmp_path / "offload_policy.py"
    script.write_text(POLICY_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=280,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "result.json").read_text())
    # what there is to offload: fp32 main params, Adam moments, non-zero gradients
    assert r["main_params"] > 0 and r["main_params_fp32"]
    # Adam's two moments for every parameter the optimizer steps (fp32 model params,
    # e.g. the norms here, have no separate main copy: the optimizer steps their shard)
    assert r["moments"] == 2 * r["optimizer_params"] > 2 * r["main_params"]
    assert r["grads_nonzero"]
    # offloaded: every byte accounted for, the same objects, data in the host buffers,
    # the gradient storage (and every main_grad view into it) released
    assert r["counts"] == r["expected_bytes"] and min(r["counts"]) > 0
    assert r["same_objects_offloaded"] and r["moved_to_host_buffers"]
    assert r["grad_storage_bytes_offloaded"] and set(r["grad_storage_bytes_offloaded"]) == {0}
    assert r["main_grad_views_released"]
    assert r["second_offload_is_noop"]
    assert r["checkpoint_written"]
    # reloaded: bit-exact, same objects, megatron's views into the buffers valid again
    assert r["same_objects_reloaded"]
    assert r["optimizer_bit_exact"] and r["grads_bit_exact"]
    assert r["main_grad_views_kept"] and r["reload_twice_is_noop"]
    # the steps after round trips equal the twin's that never offloaded
    assert r["step2_params_equal"] and r["step2_optimizer_equal"]
    assert r["default_grads_zero"] and r["default_optimizer_equal"]
    assert r["step3_params_equal"] and r["step3_optimizer_equal"]
    assert r["step3_grad_norms"][0] == r["step3_grad_norms"][1] > 0.0
    assert r["offloaded_checkpoint_loads_back"]


# --------------------------------------------------------------- hand-over order
class _Engine:
    """Records the colocated engine's memory calls (SGLangEngine releases on pause and
    resumes memory on sync and resume)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def pause(self) -> None:
        self.log.append("engine.pause/release_memory")

    def resume(self) -> None:
        self.log.append("engine.resume_memory/continue")

    def update_weights(self, buckets: Any, version: int | None = None) -> None:
        for _ in buckets:
            pass
        self.log.append("engine.update_weights")

    def shutdown(self) -> None:
        pass


class _Offload:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.offloaded = False

    def offload(self) -> None:
        self.log.append("trainer.offload")
        self.offloaded = True

    def reload(self) -> None:
        self.log.append("trainer.reload")
        self.offloaded = False


class _Policy:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def export_hf_buckets(self, bucket_bytes: int) -> Any:
        self.log.append("policy.export")
        yield []


def _components(log: list[str], **rollout: Any) -> Any:
    from archer_mcore.config import config_from_dict
    from archer_mcore.train.components import Components

    cfg = config_from_dict({"rollout": {"engine": "sglang", "weight_sync": "tensor", **rollout}})
    return Components(
        cfg=cfg, tokenizer=None, prompts=None, eval_data=None, policy=_Policy(log),  # type: ignore[arg-type]
        engine=_Engine(log), scorer=None, exporter=None, checkpoint_root=Path("."),  # type: ignore[arg-type]
        pad_id=0, offload=_Offload(log),  # type: ignore[arg-type]
    )  # fmt: skip


def test_hand_over_order_offloads_before_the_engine_takes_memory_back() -> None:
    """One loop cycle as loop.rl_step drives it: the trainer frees its memory
    (TrainerOffload.offload ends with torch.cuda.empty_cache) before the servers
    resume any memory (the sync brings their weights back), and reloads only after
    pause() released the servers'."""
    log: list[str] = []
    c = _components(log)
    c.sync_weights(0)  # initial sync, before the first rollout
    c.hand_devices_to_rollout()
    log.append("generate")
    c.hand_devices_to_training()
    log.append("train")
    c.sync_weights(1)
    c.hand_devices_to_rollout()
    assert log == [
        "trainer.offload", "policy.export", "engine.update_weights",
        "engine.resume_memory/continue", "generate",
        "engine.pause/release_memory", "trainer.reload", "train",
        "trainer.offload", "policy.export", "engine.update_weights",
        "engine.resume_memory/continue",
    ]  # fmt: skip


def test_offload_is_built_only_for_colocated_sglang_with_the_setting_on(monkeypatch) -> None:
    """rollout.colocated_offload: on (default) for colocated SGLang; off, or the local
    engine, or disaggregated servers on their own GPUs: no offload."""
    from archer_mcore.config import config_from_dict
    from archer_mcore.train.components import build_offload

    class P:
        model, optimizer = object(), object()

    def cfg(**r: Any) -> Any:
        return config_from_dict({"rollout": r})

    colocated = {"engine": "sglang", "mode": "colocated", "weight_sync": "tensor"}
    assert build_offload(cfg(**colocated), P()) is not None  # type: ignore[arg-type]
    assert build_offload(cfg(**colocated, colocated_offload=False), P()) is None  # type: ignore[arg-type]
    assert build_offload(cfg(engine="local"), P()) is None  # type: ignore[arg-type]
    servers = {"sglang": {"server_urls": ["http://h:1"]}}
    disagg = cfg(engine="sglang", mode="disaggregated", **servers)
    assert build_offload(disagg, P()) is None  # type: ignore[arg-type]


def test_without_offload_the_hand_over_only_pauses_and_resumes() -> None:
    log: list[str] = []
    c = _components(log, colocated_offload=False)
    c.offload = None
    c.hand_devices_to_training()
    c.hand_devices_to_rollout()
    assert log == ["engine.pause/release_memory", "engine.resume_memory/continue"]
