"""Context parallelism in the planner (figures derived by hand for CP = 2) and the
refusal of CP > 1 where megatron cannot run it (no Transformer Engine / no GPU) and in
this trainer, which does not split micro-batches over CP ranks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, check_context_parallel, config_from_dict, load_config
from archer_mcore.model.hf_config import shape_from_hf_config
from archer_mcore.plan import (
    GPU_SPECS,
    Cluster,
    RolloutLayout,
    TrainLayout,
    Workload,
    cp_comm_bytes,
    make_plan,
    nearest_fitting,
    rollout_memory,
    step_time,
    training_memory,
)
from archer_mcore.plan.report import _layout_diff

REPO = Path(__file__).resolve().parents[2]

# the planner tests' tiny Qwen3: 106880 parameters, 1872 activation bytes per token and
# layer (TP1, no SP, no recompute, flash attention; tests/planner/test_hand_computed.py)
TINY = {
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
}
WORK = Workload(
    prompts_per_step=4,
    samples_per_prompt=2,
    mini_batch_prompts=4,
    ppo_epochs=1,
    max_prompt_tokens=128,
    max_new_tokens=384,
    needs_reference=False,
)


def test_training_memory_cp2_by_hand():
    m = shape_from_hf_config(TINY)
    layout = TrainLayout(
        gpus=4, cp=2, micro_batch_tokens=512, recompute="none", logits_path="fused"
    )
    assert layout.dp == 2
    mem = training_memory(m, layout, WORK)
    s = mem.first
    assert s.weights == 2 * 106880 and s.gradients == 4 * 106880  # replicated over CP
    # Adam + master weights sharded over DP x CP = 4 ranks
    assert s.optimizer == 12 / 4 * 106880
    # each GPU holds 512 / 2 = 256 tokens: 256 x (2 layers x 1872 + 8 token-id bytes),
    # plus ring buffers: 2 chunks x 256 tokens x K,V (2 x 2 B x 2 heads x 16) = 65536
    assert s.activations == 256 * (2 * 1872 + 8) + 2 * 256 * 128
    # fused logits of its 256 tokens: bf16 logits whose memory takes their gradient
    # (2 B x 256 x 256 columns), plus the output weight's gradient (2 B x H 64 x 256)
    assert s.logits == 2 * 256 * 256 + 2 * 64 * 256
    # full recompute: inputs 256 x (2 x 128 + 8), one layer rebuilt 256 x 1872, buffers
    assert mem.activations_by_recompute["full"] == 256 * (2 * 128 + 8) + 256 * 1872 + 65536
    # micro-batches per DP rank: 8 sequences x (128 + 384 / 2) tokens / DP 2 / 512 -> 3
    assert mem.microbatches == 3


def test_ring_attention_traffic_by_hand():
    m = shape_from_hf_config(TINY)
    layout = TrainLayout(gpus=4, cp=2, micro_batch_tokens=512, recompute="none")
    # tokens per GPU: 8 sequences x 320 mean tokens / DP 2 / CP 2 = 640; per pass 2 layers
    # x 640 x (CP - 1) x 128 B of K/V = 163840; passes: old log-probs forward, epoch's
    # forward, backward counted twice (K/V and dK/dV) -> 4
    assert cp_comm_bytes(m, layout, WORK) == 163840 * 4
    full = dataclasses.replace(layout, recompute="full")
    assert cp_comm_bytes(m, full, WORK) == 163840 * 5  # + the recompute forward
    ref = dataclasses.replace(WORK, needs_reference=True)
    assert cp_comm_bytes(m, layout, ref) == 163840 * 5  # + the reference forward
    assert cp_comm_bytes(m, dataclasses.replace(layout, cp=1, gpus=2), WORK) == 0.0
    # CP 4 on 8 GPUs (DP 2): 8 x 320 / 2 / 4 = 320 tokens, x 3 sends -> 2 x 320 x 3 x 128 x 4
    cp4 = dataclasses.replace(layout, gpus=8, cp=4)
    assert cp_comm_bytes(m, cp4, WORK) == 2 * 320 * 3 * 128 * 4


def test_step_time_adds_the_traffic_over_the_right_link():
    m = shape_from_hf_config(TINY)
    gpu = GPU_SPECS["h100"]
    roll = RolloutLayout(num_servers=1, tp=1, mem_fraction_static=0.5)
    rmem = rollout_memory(m, roll, WORK, gpu)
    cp2 = TrainLayout(gpus=4, cp=2, micro_batch_tokens=512)
    cp1 = dataclasses.replace(cp2, cp=1)  # same 4 GPUs as DP 4: same FLOPs per GPU
    t2 = step_time(m, cp2, roll, WORK, gpu, rmem=rmem, gpus_per_node=8)
    t1 = step_time(m, cp1, roll, WORK, gpu, rmem=rmem, gpus_per_node=8)
    assert t2.cp_comm_s == pytest.approx(163840 * 4 / gpu.nvlink_bytes_per_s)
    assert t2.training_s - t1.training_s == pytest.approx(t2.cp_comm_s)
    assert t2.rollout_s == t1.rollout_s
    # TP2 x CP2 = 4 ranks across 2-GPU nodes: the NIC carries it
    wide = dataclasses.replace(cp2, tp=2, gpus=8)
    tw = step_time(m, wide, roll, WORK, gpu, rmem=rmem, gpus_per_node=2)
    assert tw.cp_comm_s == pytest.approx(cp_comm_bytes(m, wide, WORK) / gpu.network_bytes_per_s)


def test_layout_checks_and_search_include_cp():
    m = shape_from_hf_config(TINY)
    cluster = Cluster(nodes=1, gpus_per_node=8, gpu="h100", rollout_nodes=0)
    roll = RolloutLayout(num_servers=1, tp=1, mem_fraction_static=0.5, colocated=True)
    bad = make_plan(m, cluster, TrainLayout(gpus=6, tp=2, cp=2, micro_batch_tokens=512), roll, WORK)
    assert any("TP x PP x CP = 4" in p for p in bad.problems), bad.problems
    # One wide layer with one KV head: TP cannot split it (1 KV head), PP cannot (1
    # layer), recompute cannot shrink it (full recompute keeps the whole layer once more)
    # and its 256k-token micro-batch's activations (~76 GiB) overflow an H100: only
    # splitting the tokens over CP ranks fits, and the suggestion says what CP needs.
    wide = shape_from_hf_config(
        {
            **TINY,
            "hidden_size": 8192,
            "intermediate_size": 32768,
            "num_hidden_layers": 1,
            "num_attention_heads": 64,
            "num_key_value_heads": 1,
            "head_dim": 128,
        }
    )
    long = dataclasses.replace(WORK, max_prompt_tokens=4096, max_new_tokens=258048)
    train = TrainLayout(gpus=8, micro_batch_tokens=262144, recompute="none")
    plan = make_plan(wide, cluster, train, roll, long)
    assert not plan.fits and "training needs" in plan.problems[0]
    alt = nearest_fitting(wide, cluster, train, roll, long)
    assert alt is not None and alt.fits and alt.train.cp == 2
    diff = _layout_diff(plan, alt)
    assert diff[0] == "parallel.context_parallel_size=2" and "transformer_engine" in diff[1]
    # CP 2 halves the tokens per GPU: activations (plus the ring buffers) about halve
    half = alt.training.first.activations / plan.training.first.activations
    assert 0.5 < half < 0.51


def test_cp_needs_te_at_load():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"parallel": {"context_parallel_size": 2}})
    msg = str(e.value)
    assert "parallel.context_parallel_size = 2" in msg and "transformer_engine" in msg
    cfg = config_from_dict(
        {
            "parallel": {"context_parallel_size": 2},
            "model": {"transformer_impl": "transformer_engine"},
        }
    )
    assert cfg.parallel.context_parallel_size == 2


def test_cp_refused_at_build_saying_why():
    cfg = config_from_dict(
        {
            "parallel": {"context_parallel_size": 2},
            "model": {"transformer_impl": "transformer_engine"},
        }
    )
    with pytest.raises(ConfigError, match="transformer_engine is not importable, no CUDA device"):
        check_context_parallel(cfg, te_importable=False, cuda=False)
    with pytest.raises(ConfigError, match=r"here: no CUDA device\)"):
        check_context_parallel(cfg, te_importable=True, cuda=False)
    with pytest.raises(ConfigError, match="does not yet split micro-batches"):
        check_context_parallel(cfg, te_importable=True, cuda=True)
    check_context_parallel(config_from_dict({}), te_importable=False, cuda=False)  # CP 1


def test_trainer_refuses_cp_before_any_work(tmp_path, monkeypatch):
    from archer_mcore.train import components

    def no_tokenizer(*a, **k):
        raise AssertionError("work started before the CP check")

    monkeypatch.setattr(components, "build_tokenizer", no_tokenizer)
    cfg = load_config(
        REPO / "configs" / "demo_cpu.yaml",
        ["parallel.context_parallel_size=2", "model.transformer_impl=transformer_engine"],
    )
    with pytest.raises(ConfigError, match="context parallelism needs Transformer Engine"):
        components.build_components(cfg)


def test_archer_plan_reports_cp(capsys):
    from archer_mcore.cli.plan import main

    rc = main(
        [
            str(REPO / "configs" / "qwen3_32b_dapo.yaml"),
            "-o",
            "parallel.context_parallel_size=2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "TP8 PP1 CP2 DP4" in out
    # the preset's parallel.micro_batch_tokens (49152) split over CP = 2
    assert "context parallel CP2: 24576 tokens of each micro-batch per GPU" in out
