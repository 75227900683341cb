"""The policy's settings (`PolicyConfig`) and what it decides from them and the machine
(`PolicyChoices`: the model builder's choices and the kernel path). Plain data and pure
functions, without megatron's runtime: `archer plan` and the trainer's config
translation read them without building a model; `actor.policy` builds from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from archer_mcore.actor import kernel_dispatch
from archer_mcore.config import KernelsConfig, ModelConfig, OptimizerConfig, ParallelConfig
from archer_mcore.model.build import BuildChoices, resolve_build_choices


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    """The policy's settings: the config sections it reads, embedded whole (no copies
    of their fields), plus what comes from elsewhere in the config.

    model, parallel, optimizer, kernels: the `Config` sections of those names
        (parallel.micro_batch_tokens: the token budget of one micro-batch, padding
        included; parallel.pack_sequences: packed sequences instead of padded rows;
        optimizer.lr_schedule decays over `lr_decay_steps`).
    seed: initialisation seed. temperature: the rollout temperature the log-probs and
    entropies are computed at. with_reference: keep a frozen reference copy (KL).
    lr_decay_steps: optimizer steps of the LR decay (None: no decay within the run).
    logprob_chunk_rows: rows per chunk of the torch entropy/log-prob reference.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    seed: int = 1234
    temperature: float = 1.0
    with_reference: bool = True
    lr_decay_steps: int | None = None
    logprob_chunk_rows: int = 4096

    @property
    def tp(self) -> int:
        return self.parallel.tensor_model_parallel_size

    @property
    def pp(self) -> int:
        return self.parallel.pipeline_model_parallel_size


@dataclass(frozen=True)
class PolicyChoices:
    """Everything the policy decides from its config and the machine: the model
    builder's choices and the kernel path. `archer plan` uses the same function."""

    build: BuildChoices
    kernel_path: kernel_dispatch.KernelPath


def resolve_policy_choices(
    cfg: PolicyConfig,
    te_version: str | None,
    device_capability: tuple[int, int] | None,
    cuda: bool,
    triton_compiles: bool | None = None,
) -> PolicyChoices:
    """Pure given its arguments (`triton_compiles` None: ask triton)."""
    return PolicyChoices(
        resolve_build_choices(
            cfg.model,
            cfg.parallel,
            te_version=te_version,
            device_capability=device_capability,
            cuda=cuda,
        ),
        kernel_dispatch.resolve_kernel_path(
            cfg.kernels.mode, cfg.kernels.fused_lm_head, cuda, triton_compiles
        ),
    )
