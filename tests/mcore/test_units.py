"""Fast single-process checks: layer-spec/FP8-recipe selection, the CPU layer's
scope, rank discovery, config parsing, micro-batch planning and bucketing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_hf_config

from archer_mcore.actor.policy_batch import PolicyBatch, build_microbatches, plan_microbatches
from archer_mcore.config import ModelConfig, ParallelConfig
from archer_mcore.model.build import resolve_build_choices
from archer_mcore.model.hf_config import shape_from_hf_config
from archer_mcore.model.weights import bucketize
from archer_mcore.parallel import cpu_compat
from archer_mcore.parallel.distributed import first_slurm_host, read_dist_env


# ------------------------------------------------------------ the builder's choices
def test_build_choices_sequence_parallel_padding_and_dtype():
    """SP at TP>1 pads lengths to TP; FP8 (TE + Hopper) to 16 more; SP at TP=1 is an error."""
    sp4 = ParallelConfig(tensor_model_parallel_size=4, sequence_parallel=True)
    local = ModelConfig()
    c = resolve_build_choices(local, sp4, None, None, cuda=False)
    assert (c.sequence_parallel, c.seq_multiple, c.params_dtype) == (True, 4, torch.float32)
    assert c.precision.spec == "local" and not c.precision.fp8_enabled
    te_fp8 = ModelConfig(transformer_impl="transformer_engine", fp8="delayed")
    c = resolve_build_choices(te_fp8, sp4, "2.8.0", (9, 0), cuda=True)
    assert (c.seq_multiple, c.params_dtype, c.precision.fp8_recipe) == (
        64,
        torch.bfloat16,
        "delayed",
    )
    c = resolve_build_choices(te_fp8, ParallelConfig(), "2.8.0", (9, 0), cuda=True)
    assert (c.sequence_parallel, c.seq_multiple) == (False, 16)
    # The same FP8 request without TE: megatron's local layers in BF16, no padding.
    c = resolve_build_choices(te_fp8, ParallelConfig(), None, (9, 0), cuda=True)
    assert (c.precision.spec, c.seq_multiple) == ("local", 1)
    with pytest.raises(ValueError, match="parallel.sequence_parallel"):
        resolve_build_choices(local, ParallelConfig(sequence_parallel=True), None, None, False)
    with pytest.raises(ValueError, match="transformer_impl"):
        resolve_build_choices(ModelConfig(fp8="delayed"), ParallelConfig(), "2.8", (9, 0), True)


# ------------------------------------------------------------ CPU compatibility layer
def test_cpu_layer_maps_cuda_requests_and_is_undone_on_exit():
    orig_sync = torch.cuda.synchronize
    with cpu_compat.cpu_compat() as active:
        assert active and cpu_compat.is_active()
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(3, device=torch.cuda.current_device()).device.type == "cpu"
        assert torch.ones(1, device=torch.device("cuda", 0)).device.type == "cpu"
        t = torch.arange(3.0)
        assert t.cuda() is t and t.to("cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.type(torch.float64).dtype == torch.float64  # the conversion form still works
        torch.cuda.synchronize()
        # "CUDA" RNG calls drive the CPU generator: same seed, same numbers.
        torch.cuda.manual_seed(3)
        a = torch.randn(4)
        torch.manual_seed(3)
        assert torch.equal(a, torch.randn(4))
        state = torch.cuda.get_rng_state()
        b = torch.randn(2)
        torch.cuda.set_rng_state(state)
        assert torch.equal(b, torch.randn(2))
    assert not cpu_compat.is_active()
    assert torch.cuda.synchronize is orig_sync
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_cpu_layer_never_activates_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    orig = torch.cuda.current_device
    assert cpu_compat.activate() is False
    assert not cpu_compat.is_active() and torch.cuda.current_device is orig
    with cpu_compat.cpu_compat() as active:
        assert active is False and not cpu_compat.is_active()


# ------------------------------------------------------------ rank discovery
def test_torchrun_env_wins_over_slurm():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "n0",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "9",
    }
    e = read_dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (
        3,
        8,
        1,
        "n0",
        1234,
    )


def test_slurm_env_and_nodelist():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_JOB_NODELIST": "gpu[007-008,011]",
    }
    e = read_dist_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port) == (
        5,
        16,
        5,
        "gpu007",
        29500,
    )
    assert first_slurm_host("a1,b2") == "a1" and first_slurm_host("node[3]") == "node3"
    assert read_dist_env({}).world_size == 1


# ------------------------------------------------------------ HF config parsing
def test_shape_from_configs_and_clear_errors():
    q3 = shape_from_hf_config(
        tiny_hf_config("qwen3", rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    )
    assert (q3.head_dim, q3.qk_norm, q3.qkv_bias, q3.rope_theta, q3.tie_embeddings) == (
        16,
        True,
        False,
        1e6,
        False,
    )
    q2 = shape_from_hf_config(tiny_hf_config("qwen2"))
    assert (q2.head_dim, q2.qk_norm, q2.qkv_bias, q2.rope_theta, q2.rms_eps) == (
        8,
        False,
        True,
        50000.0,
        1e-5,
    )
    # Padded to a multiple of 128 whatever the TP (so checkpoints reshard across TP);
    # a TP that does not divide 128 pads to a multiple of lcm(128, tp).
    assert [q2.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [128] * 4
    assert q2.padded_vocab_size(3) == 384 and q2.padded_vocab_size(1, 64) == 128
    big = replace(q2, vocab_size=151_665)
    assert [big.padded_vocab_size(tp) for tp in (1, 2, 8)] == [151_680] * 3
    with pytest.raises(ValueError, match="model_type 'llama'"):
        shape_from_hf_config({**tiny_hf_config("qwen2"), "model_type": "llama"})
    with pytest.raises(ValueError, match="type 'linear' is not supported"):
        shape_from_hf_config(
            tiny_hf_config("qwen2", rope_scaling={"rope_type": "linear", "factor": 4.0})
        )
    with pytest.raises(ValueError, match="hidden_act"):
        shape_from_hf_config(tiny_hf_config("qwen3", hidden_act="gelu"))


# ------------------------------------------------------------ micro-batching
def test_token_budget_plan_covers_every_row_once_and_keeps_padding_small():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (64,), generator=g)
    plan = plan_microbatches(lengths, token_budget=512)
    rows = torch.cat(plan.rows)
    assert sorted(rows.tolist()) == list(range(64))
    for r, n in zip(plan.rows, plan.lengths):
        assert n == int(lengths[r].max())
        assert len(r) == 1 or len(r) * n <= 512
    padded = sum(len(r) * n for r, n in zip(plan.rows, plan.lengths))
    assert padded / int(lengths.sum()) < 1.25  # sorted packing: < 25% padding here
    # A sequence longer than the budget still gets (its own) micro-batch.
    big = plan_microbatches(torch.tensor([700, 10, 10]), token_budget=512)
    assert [len(r) for r in big.rows] == [1, 2]


def test_plan_pads_lengths_to_the_multiple_and_batches_are_padded_with_zeros():
    plan = plan_microbatches(torch.tensor([13, 9, 4]), token_budget=32, seq_multiple=8)
    # 13 -> 16 and 9 -> 16: two rows of 16 fill the budget; 4 -> 8 starts a new one.
    assert [r.tolist() for r in plan.rows] == [[0, 1], [2]]
    assert plan.lengths == [16, 8]
    ids = torch.tensor([[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    batch = PolicyBatch(ids, torch.tensor([2, 1]), mask)
    (mb,) = build_microbatches(batch, plan_microbatches(batch.seq_lengths(), 100, seq_multiple=4))
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [4, 3, 0, 0, 0, 0, 0, 0]]
    assert mb.extras["targets"][0].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="seq_multiple"):
        plan_microbatches(torch.tensor([3]), 10, seq_multiple=0)


def test_microbatch_response_positions_by_hand():
    # row 0: prompt [5, 6], response [7, 8, 9]; row 1: prompt [4], response [3], pads.
    ids = torch.tensor([[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    batch = PolicyBatch(ids, torch.tensor([2, 1]), mask, advantages=torch.tensor([1.0, -1.0]))
    (mb,) = build_microbatches(batch, plan_microbatches(batch.seq_lengths(), 100))
    order = mb.extras["rows"].tolist()
    assert order == [0, 1] and mb.input_ids.shape == (2, 5)
    # Response token j of row i is predicted by the logits at position prompt + j - 1.
    assert mb.extras["resp_pos"].tolist() == [[1, 2, 3], [0, 1, 2]]
    assert mb.extras["targets"][0].tolist() == [7, 8, 9] and mb.extras["targets"][1, 0] == 3
    assert mb.extras["mask"].tolist() == mask.tolist()


def test_batch_validation_errors():
    with pytest.raises(ValueError, match="past the end"):
        PolicyBatch(
            torch.zeros(1, 3, dtype=torch.long),
            torch.tensor([2]),
            torch.ones(1, 2, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="prompt token"):
        PolicyBatch(
            torch.zeros(1, 3, dtype=torch.long),
            torch.tensor([0]),
            torch.ones(1, 2, dtype=torch.bool),
        )


def test_bucketize_respects_byte_budget_and_order():
    tensors = [
        (f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])
    ]  # fp32: 4 B each
    buckets = list(bucketize(tensors, bucket_bytes=120))
    # bytes 40, 40, 120, 20, 400, 4: 40+40 fits; +120 would not; 120 alone is full; 20
    # starts a bucket that 400 cannot join; 400 goes alone (over budget); 4 alone.
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2"], ["t3"], ["t4"], ["t5"]]
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]


def test_backward_runs_with_the_layer_active():
    """Code run by autograd during backward (e.g. activation recompute) still sees the layer."""
    devices = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            devices.append(torch.ones(1, device="cuda").device.type)
            return g * 2

    with cpu_compat.cpu_compat():
        x = torch.ones(3, requires_grad=True)
        Probe.apply(x).sum().backward()
        assert torch.equal(x.grad, torch.full((3,), 2.0))
        y = torch.ones(2, requires_grad=True)
        torch.autograd.backward([Probe.apply(y).sum()], grad_tensors=[torch.tensor(3.0)])
        assert torch.equal(y.grad, torch.full((2,), 6.0))
    assert devices == ["cpu", "cpu"]
