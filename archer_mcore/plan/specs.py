"""What the estimate starts from: GPU datasheets, the assumptions the config does not
state, the training and rollout layouts, and one RL step's workload. Units: bytes,
FLOP/s, bytes/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

KIB, MIB, GIB = 1024, 1024**2, 1024**3

RecomputeMode = Literal["none", "selective", "full"]
LogitsPath = Literal["unfused", "chunked", "fused", "fused_lm_head"]


# --------------------------------------------------------------------------- hardware
@dataclass(frozen=True, kw_only=True)
class GpuSpec:
    """Datasheet figures of one GPU (dense tensor-core peaks, one direction links)."""

    name: str
    memory_bytes: int
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s
    fp8_flops: float  # dense FP8 tensor-core peak, FLOP/s
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per GPU, one direction
    network_bytes_per_s: float  # per GPU (one 400 Gb/s NIC per GPU), one direction
    compute_capability: tuple[int, int] = (9, 0)  # Hopper: FP8 tensor cores


GPU_SPECS: dict[str, GpuSpec] = {
    # nvidia-smi reports 81559 MiB for the 80 GB parts and 143771 MiB for H200.
    "h800": GpuSpec(
        name="H800 SXM5 80GB",
        memory_bytes=81559 * MIB,
        bf16_flops=989.4e12,
        fp8_flops=1978.9e12,
        hbm_bytes_per_s=3.35e12,
        nvlink_bytes_per_s=200e9,
        network_bytes_per_s=50e9,
    ),
    "h100": GpuSpec(
        name="H100 SXM5 80GB",
        memory_bytes=81559 * MIB,
        bf16_flops=989.4e12,
        fp8_flops=1978.9e12,
        hbm_bytes_per_s=3.35e12,
        nvlink_bytes_per_s=450e9,
        network_bytes_per_s=50e9,
    ),
    "h200": GpuSpec(
        name="H200 SXM 141GB",
        memory_bytes=143771 * MIB,
        bf16_flops=989.4e12,
        fp8_flops=1978.9e12,
        hbm_bytes_per_s=4.8e12,
        nvlink_bytes_per_s=450e9,
        network_bytes_per_s=50e9,
    ),
}


@dataclass(frozen=True, kw_only=True)
class Assumptions:
    """Knobs of the estimate that the config does not say.

    `gated_mlp`, `dropout` and `flash_attention` describe the layer; Qwen2/Qwen3 are
    SwiGLU without dropout and the trainer uses flash attention. The other values
    let the tests reproduce megatron's (GeLU, dropout, unfused attention) formula.
    """

    gated_mlp: bool = True
    dropout: bool = False
    flash_attention: bool = True
    usable_memory_fraction: float = 0.92  # the rest: CUDA context, NCCL, fragmentation
    sglang_min_free_bytes: int = 6 * GIB  # SGLang's activations/CUDA graphs outside its pool
    mfu_train: float = 0.35
    bandwidth_efficiency: float = 0.6  # achieved / peak HBM bandwidth when decoding
    mean_prompt_tokens: int = 256
    mean_response_fraction: float = 0.5  # mean response length / max_new_tokens
    response_length_sigma: float = 0.8  # log-sd of the (lognormal) response lengths
    torch_chunk_rows: int = 4096  # rows per chunk of the torch entropy reference (the policy's)
    te_version: str | None = "2.8.0"  # Transformer Engine on the cluster (None: not installed)
    lm_head_chunk_rows: int = 4096  # rows per chunk of the fused linear-head kernel


#: The assumptions every estimate uses unless given others (frozen, so one shared value).
DEFAULT_ASSUMPTIONS = Assumptions()


# --------------------------------------------------------------------------- layouts
@dataclass(frozen=True, kw_only=True)
class TrainLayout:
    """How the trainer splits the policy over its GPUs."""

    gpus: int
    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    recompute: RecomputeMode = "none"
    distributed_optimizer: bool = True
    micro_batch_tokens: int = 8192
    logits_path: LogitsPath = "fused"
    fp8: bool = False
    cp: int = 1  # context parallel: a micro-batch's tokens split over cp GPUs
    pack_sequences: bool = True
    ep: int = 1  # expert parallel (MoE): the routed experts split over ep GPUs

    @property
    def expert_dp(self) -> int:
        """The expert data-parallel size: GPUs / (expert-TP (= TP) x EP x PP), the
        group the routed experts' gradients are reduced and their optimizer states
        sharded over."""
        return self.gpus // (self.tp * self.ep * self.pp)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def model_parallel(self) -> int:
        """GPUs one model replica spans: TP x PP x CP."""
        return self.tp * self.pp * self.cp

    @property
    def seq_multiple(self) -> int:
        """What micro-batch lengths are rounded up to, as `model.build` decides it:
        TP under sequence parallelism, x16 under FP8."""
        from archer_mcore.model.build import FP8_TOKEN_MULTIPLE

        sp = self.tp if self.sequence_parallel and self.tp > 1 else 1
        return sp * (FP8_TOKEN_MULTIPLE if self.fp8 else 1)

    def describe(self) -> str:
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        ep = f" EP{self.ep}" if self.ep > 1 else ""
        return (
            f"TP{self.tp} PP{self.pp}{cp}{ep} DP{self.dp}, "
            f"SP {'on' if self.sequence_parallel else 'off'}, "
            f"recompute {self.recompute}, distributed optimizer "
            f"{'on' if self.distributed_optimizer else 'off'}, micro-batch "
            f"{self.micro_batch_tokens} tokens "
            f"({'packed sequences' if self.pack_sequences else 'padded rows'}), "
            f"logits path {self.logits_path}"
        )


@dataclass(frozen=True, kw_only=True)
class RolloutLayout:
    """SGLang servers: `num_servers` x `tp` GPUs, static memory fraction per GPU.

    `async_steps` is `rollout.async_steps`: 1 generates step k+1's batch while step k
    trains (disaggregated only; colocated servers share the trainer's GPUs and are
    paused while it trains, so nothing overlaps there)."""

    num_servers: int
    tp: int
    mem_fraction_static: float
    fp8_weights: bool = False
    colocated: bool = False
    async_steps: int = 0

    @property
    def overlaps_training(self) -> bool:
        """Whether generation runs while the trainer trains (async, disaggregated)."""
        return self.async_steps > 0 and not self.colocated

    def describe(self) -> str:
        mode = "colocated" if self.colocated else "disaggregated"
        if self.overlaps_training:
            mode += f", {self.async_steps} step ahead of training"
        return (
            f"{self.num_servers} SGLang server(s) x TP{self.tp} ({mode}), "
            f"mem_fraction_static {self.mem_fraction_static:g}, weights "
            f"{'fp8' if self.fp8_weights else 'bf16'}"
        )


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One RL step: what is generated and trained on."""

    prompts_per_step: int
    samples_per_prompt: int
    mini_batch_prompts: int
    ppo_epochs: int
    max_prompt_tokens: int
    max_new_tokens: int
    needs_reference: bool  # a KL term: one reference forward per step

    @property
    def sequences(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def max_sequence_tokens(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens
