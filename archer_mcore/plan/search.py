"""Layouts from a config, the checks that make a layout impossible, a `Plan` of one
layout, and the search for the nearest layout that fits.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archer_mcore.config import Config, ConfigError
from archer_mcore.model.hf_config import ModelShape, model_hf_config, shape_from_hf_config
from archer_mcore.plan.memory import RolloutMemory, TrainingMemory, rollout_memory, training_memory
from archer_mcore.plan.specs import (
    DEFAULT_ASSUMPTIONS,
    GIB,
    GPU_SPECS,
    Assumptions,
    GpuSpec,
    LogitsPath,
    RolloutLayout,
    TrainLayout,
    Workload,
)
from archer_mcore.plan.steptime import StepTime, step_time


@dataclass(frozen=True, kw_only=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu: str
    rollout_nodes: int

    @property
    def spec(self) -> GpuSpec:
        return GPU_SPECS[self.gpu]


@dataclass(kw_only=True)
class Plan:
    model: ModelShape
    cluster: Cluster
    train: TrainLayout
    rollout: RolloutLayout
    work: Workload
    training: TrainingMemory
    rollout_mem: RolloutMemory
    time: StepTime
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems


def shape_from_config(cfg: Config, config_path: str | Path | None = None) -> ModelShape:
    """The model's shape from `model.path`'s config.json, else from `model.arch`
    (`model_hf_config`, the builder's reader).

    A relative `model.path` is tried from the working directory, then from the
    directory above the config file's (the repository root for `configs/*.yaml`).
    """
    search_dirs: list[Path] = []
    if config_path is not None:
        here = Path(config_path).resolve().parent
        search_dirs = [here, here.parent]
    return shape_from_hf_config(model_hf_config(cfg.model, search_dirs))


def workload_from_config(cfg: Config) -> Workload:
    """The run's workload; the token rule says whether the loss needs a reference
    model (its KL coefficients)."""
    from archer_mcore.algo.token_rules import token_rule_for  # torch: only when planning

    return Workload(
        prompts_per_step=cfg.train.prompts_per_step,
        samples_per_prompt=cfg.rollout.n_samples_per_prompt,
        mini_batch_prompts=cfg.train.mini_batch_prompts,
        ppo_epochs=cfg.train.ppo_epochs,
        max_prompt_tokens=cfg.data.max_prompt_length,
        max_new_tokens=cfg.rollout.max_new_tokens,
        needs_reference=token_rule_for(cfg.algorithm).needs_reference(),
    )


def resolved_choices(
    cfg: Config,
    te_version: str | None,
    device_capability: tuple[int, int] | None,
    cuda: bool = True,
    triton_compiles: bool | None = True,
) -> Any:
    """The trainer's own choices for this config on a machine (TE version, GPU
    capability, CUDA, whether triton compiles): `MegatronPolicy` builds with exactly
    `resolve_policy_choices`, so what the plan sizes is what the trainer builds.
    Returns a `PolicyChoices`; raises ValueError for contradictory settings (e.g. FP8
    with the local layers, sequence parallelism at TP=1)."""
    from archer_mcore.actor.policy_config import PolicyConfig, resolve_policy_choices

    pcfg = PolicyConfig(
        model=cfg.model, parallel=cfg.parallel, optimizer=cfg.optimizer, kernels=cfg.kernels
    )
    return resolve_policy_choices(pcfg, te_version, device_capability, cuda, triton_compiles)


def logits_path_of(choices: Any) -> LogitsPath:
    """The planner's logits-buffer model for the policy's kernel path: the Triton fused
    LM head never materialises logits; the Triton entropy kernel reads the
    vocab-parallel logits; the torch reference (also behind the fused-LM-head switch,
    whose torch path makes the logits) works on them in row chunks."""
    path = choices.kernel_path
    if path.mode == "torch":
        return "chunked"
    return "fused_lm_head" if path.fused_lm_head else "fused"


def replace_sp_for_tp1(cfg: Config) -> Config:
    """`cfg` with sequence parallelism off when TP = 1 (the planner reports that setting
    as a problem itself, naming the key; the other choices are still planned)."""
    p = cfg.parallel
    if p.sequence_parallel and p.tensor_model_parallel_size == 1:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(p, sequence_parallel=False))
    return cfg


def cluster_from_config(
    cfg: Config, nodes: int | None = None, gpus_per_node: int | None = None, gpu: str | None = None
) -> Cluster:
    gpu_type = gpu or cfg.slurm.gpu_type
    if gpu_type not in GPU_SPECS:
        raise ConfigError(
            f"slurm.gpu_type = {gpu_type!r}: the planner needs one of {', '.join(GPU_SPECS)} "
            "(pass --gpu)"
        )
    gpn = gpus_per_node if gpus_per_node is not None else cfg.slurm.gpus_per_node
    if gpn < 1:
        raise ConfigError("slurm.gpus_per_node must be >= 1 for a GPU plan (pass --gpus-per-node)")
    return Cluster(
        nodes=nodes if nodes is not None else cfg.slurm.nodes,
        gpus_per_node=gpn,
        gpu=gpu_type,
        rollout_nodes=cfg.slurm.rollout_nodes,
    )


def layouts_from_config(
    cfg: Config,
    cluster: Cluster,
    assume: Assumptions = DEFAULT_ASSUMPTIONS,
    choices: Any | None = None,
) -> tuple[TrainLayout, RolloutLayout]:
    """The layouts the config asks for. Sequence parallelism, FP8 and the logits path
    are the trainer's resolved choices (`resolved_choices`) on the cluster's GPUs with
    `assume.te_version`, unless `choices` (a `PolicyChoices`) is given."""
    disagg = cfg.rollout.mode == "disaggregated"
    train_nodes = cluster.nodes - cluster.rollout_nodes if disagg else cluster.nodes
    p = cfg.parallel
    if choices is None:
        choices = resolved_choices(
            replace_sp_for_tp1(cfg), assume.te_version, cluster.spec.compute_capability
        )
    train = TrainLayout(
        gpus=max(0, train_nodes) * cluster.gpus_per_node,
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        # SP at TP = 1 stays visible here so that check_layout names the key.
        sequence_parallel=choices.build.sequence_parallel or p.sequence_parallel,
        recompute=cfg.model.recompute,
        distributed_optimizer=p.use_distributed_optimizer,
        micro_batch_tokens=p.micro_batch_tokens,
        logits_path=logits_path_of(choices),
        fp8=choices.build.precision.fp8_enabled,
        cp=p.context_parallel_size,
        pack_sequences=p.pack_sequences,
        ep=p.expert_model_parallel_size,
    )
    s = cfg.rollout.sglang
    roll = RolloutLayout(
        num_servers=s.num_servers,
        tp=s.tp_size,
        mem_fraction_static=s.mem_fraction_static,
        fp8_weights=cfg.rollout.fp8,
        colocated=not disagg,
        async_steps=cfg.rollout.async_steps,
    )
    return train, roll


def check_layout(
    m: ModelShape, cluster: Cluster, train: TrainLayout, roll: RolloutLayout, work: Workload
) -> list[str]:
    """Everything that makes a layout impossible, each naming the config key."""
    errs: list[str] = []
    tp, pp = train.tp, train.pp
    if train.gpus <= 0:
        errs.append(
            f"no training GPUs: slurm.nodes ({cluster.nodes}) must exceed slurm.rollout_nodes "
            f"({cluster.rollout_nodes})"
        )
        return errs
    if train.gpus % (tp * pp):
        errs.append(
            f"{train.gpus} training GPUs are not a multiple of TP x PP = {tp * pp} "
            "(parallel.tensor_model_parallel_size x parallel.pipeline_model_parallel_size)"
        )
    elif train.gpus % train.model_parallel:
        errs.append(
            f"{train.gpus} training GPUs are not a multiple of TP x PP x CP = "
            f"{train.model_parallel} (parallel.context_parallel_size = {train.cp})"
        )
    if tp > cluster.gpus_per_node:
        errs.append(f"TP {tp} spans more than one node ({cluster.gpus_per_node} GPUs per node)")
    if m.num_heads % tp or m.num_kv_heads % tp:
        errs.append(
            f"parallel.tensor_model_parallel_size = {tp} must divide the attention heads "
            f"({m.num_heads}) and the KV heads ({m.num_kv_heads})"
        )
    if m.num_layers % pp:
        errs.append(
            f"parallel.pipeline_model_parallel_size = {pp} must divide num_layers ({m.num_layers})"
        )
    if train.sequence_parallel and tp == 1:
        errs.append("parallel.sequence_parallel needs tensor_model_parallel_size > 1")
    errs += _moe_layout_problems(m, train)
    if train.micro_batch_tokens < work.max_sequence_tokens:
        errs.append(
            f"parallel.micro_batch_tokens = {train.micro_batch_tokens} is below the longest "
            f"sequence (data.max_prompt_length + rollout.max_new_tokens = "
            f"{work.max_sequence_tokens}): one response would not fit a micro-batch"
        )
    gpus_rollout = (
        cluster.nodes * cluster.gpus_per_node
        if roll.colocated
        else cluster.rollout_nodes * cluster.gpus_per_node
    )
    if not roll.colocated and cluster.rollout_nodes < 1:
        errs.append("rollout.mode = disaggregated needs slurm.rollout_nodes >= 1")
    elif roll.num_servers * roll.tp > gpus_rollout:
        errs.append(
            f"rollout.sglang.num_servers x tp_size = {roll.num_servers * roll.tp} exceeds the "
            f"{gpus_rollout} rollout GPUs"
        )
    if m.num_heads % roll.tp:
        errs.append(
            f"rollout.sglang.tp_size = {roll.tp} must divide the attention heads ({m.num_heads})"
        )
    if roll.tp > cluster.gpus_per_node:
        errs.append(f"rollout.sglang.tp_size {roll.tp} spans more than one node")
    return errs


def _moe_layout_problems(m: ModelShape, train: TrainLayout) -> list[str]:
    """Expert parallelism's constraints, each naming the config key."""
    ep, tp, pp = train.ep, train.tp, train.pp
    if not m.is_moe:
        if ep > 1:
            return [
                f"parallel.expert_model_parallel_size = {ep} needs an MoE model; "
                f"{m.model_type} has no experts"
            ]
        return []
    errs = []
    if m.num_experts % ep:
        errs.append(
            f"parallel.expert_model_parallel_size = {ep} must divide the {m.num_experts} experts"
        )
    if train.gpus % (tp * ep * pp):
        errs.append(
            f"{train.gpus} training GPUs are not a multiple of TP x EP x PP = {tp * ep * pp} "
            "(parallel.expert_model_parallel_size: the expert groups)"
        )
    if tp > 1 and not train.sequence_parallel:
        errs.append(
            "parallel.sequence_parallel must be true for an MoE model at "
            f"parallel.tensor_model_parallel_size = {tp} (megatron's MoE layer trains at "
            "TP > 1 only with it)"
        )
    return errs


def memory_problems(plan: Plan, assume: Assumptions) -> list[str]:
    gpu = plan.cluster.spec
    usable = gpu.memory_bytes * assume.usable_memory_fraction
    errs = []
    peak = plan.training.peak
    if peak.total > usable:
        errs.append(
            f"training needs {peak.total / GIB:.1f} GiB per GPU, more than the "
            f"{usable / GIB:.1f} GiB usable on a {gpu.name}"
        )
    r = plan.rollout_mem
    if r.concurrent_full_sequences < 1:
        errs.append(
            f"SGLang KV pool ({r.kv_pool / GIB:.1f} GiB per GPU after {r.weights / GIB:.1f} GiB "
            f"of weights) cannot hold one {plan.work.max_sequence_tokens}-token sequence "
            f"({r.kv_per_token * plan.work.max_sequence_tokens / GIB:.2f} GiB)"
        )
    if r.free_outside_pool < assume.sglang_min_free_bytes:
        errs.append(
            f"rollout.sglang.mem_fraction_static = {plan.rollout.mem_fraction_static:g} leaves "
            f"{r.free_outside_pool / GIB:.1f} GiB outside SGLang's pool, under the "
            f"{assume.sglang_min_free_bytes / GIB:.0f} GiB its activations and CUDA graphs need"
        )
    return errs


def make_plan(
    m: ModelShape,
    cluster: Cluster,
    train: TrainLayout,
    roll: RolloutLayout,
    work: Workload,
    *,
    assume: Assumptions = DEFAULT_ASSUMPTIONS,
) -> Plan:
    tmem = training_memory(m, train, work, assume) if train.gpus > 0 and train.dp > 0 else None
    if tmem is None:  # no training GPUs: still report the rollout side
        tmem = training_memory(
            m, dataclasses.replace(train, gpus=train.model_parallel), work, assume
        )
    reserved = 0.0
    if roll.colocated:  # the trainer's weights, gradients and optimizer stay resident
        p = tmem.peak
        reserved = p.weights + p.gradients + p.optimizer
    rmem = rollout_memory(m, roll, work, cluster.spec, assume=assume, reserved_by_trainer=reserved)
    servers = max(1, roll.num_servers)
    tt = step_time(
        m,
        dataclasses.replace(train, gpus=max(train.gpus, train.model_parallel)),
        dataclasses.replace(roll, num_servers=servers),
        work,
        cluster.spec,
        rmem=rmem,
        assume=assume,
        gpus_per_node=cluster.gpus_per_node,
    )
    plan = Plan(
        model=m,
        cluster=cluster,
        train=train,
        rollout=roll,
        work=work,
        training=tmem,
        rollout_mem=rmem,
        time=tt,
    )
    plan.problems = check_layout(m, cluster, train, roll, work)
    plan.problems += memory_problems(plan, assume)
    return plan


def _divisors_pow2(limit: int) -> list[int]:
    return [x for x in (1, 2, 4, 8, 16) if x <= limit]


#: The training-layout settings the search varies, each counted once in a distance.
_TRAIN_KEYS = (
    "tp",
    "pp",
    "sequence_parallel",
    "recompute",
    "logits_path",
    "distributed_optimizer",
    "micro_batch_tokens",
    "ep",
)


def _train_candidates(
    m: ModelShape, cluster: Cluster, train: TrainLayout, work: Workload
) -> list[tuple[int, TrainLayout]]:
    """Training layouts near `train` (TP, PP, SP, recompute, logits path, distributed
    optimizer, micro-batch budget, then CP), each with how many settings differ."""
    mbt_options = sorted({train.micro_batch_tokens, max(work.max_sequence_tokens, 1)})
    trains: list[tuple[int, TrainLayout]] = []
    for tp in _divisors_pow2(cluster.gpus_per_node):
        for pp in (1, 2, 4, 8):
            if m.num_layers % pp or train.gpus % (tp * pp) or train.gpus < tp * pp:
                continue
            settings = itertools.product(
                {False, True} if tp > 1 else {False},
                ("none", "selective", "full"),
                ("fused", "fused_lm_head", train.logits_path),
                (True, train.distributed_optimizer),
                mbt_options,
            )
            for sp, rc, path, dopt, mbt in settings:
                cand = dataclasses.replace(
                    train,
                    tp=tp,
                    pp=pp,
                    sequence_parallel=sp,
                    recompute=rc,
                    logits_path=path,
                    distributed_optimizer=dopt,
                    micro_batch_tokens=mbt,
                )
                d = sum(getattr(cand, k) != getattr(train, k) for k in _TRAIN_KEYS)
                trains.append((d, cand))
    with_cp = [
        (d + (cp != train.cp), dataclasses.replace(t, cp=cp))
        for d, t in trains
        for cp in sorted({1, 2, 4, train.cp})
        if train.gpus % (t.tp * t.pp * cp) == 0
    ]
    if not m.is_moe:  # dense: EP stays as configured (1)
        return with_cp
    eps = sorted({e for e in (1, 2, 4, 8, 16, 32, 64) if m.num_experts % e == 0} | {train.ep})
    return [
        (d + (ep != train.ep), dataclasses.replace(t, ep=ep))
        for d, t in with_cp
        for ep in eps
        if train.gpus % (t.tp * ep * t.pp) == 0
    ]


def _rollout_candidates(cluster: Cluster, roll: RolloutLayout) -> list[tuple[int, RolloutLayout]]:
    """Rollout layouts near `roll` (server TP filling the rollout GPUs, static memory
    fraction), each with how many settings differ."""
    rolls: list[tuple[int, RolloutLayout]] = []
    gpus_r = (cluster.nodes if roll.colocated else cluster.rollout_nodes) * cluster.gpus_per_node
    for rtp in _divisors_pow2(cluster.gpus_per_node):
        for frac in sorted({roll.mem_fraction_static, 0.7, 0.8, 0.85}):
            servers = gpus_r // rtp if rtp != roll.tp else roll.num_servers
            if servers < 1:
                continue
            cand = dataclasses.replace(roll, tp=rtp, num_servers=servers, mem_fraction_static=frac)
            d = (
                (rtp != roll.tp)
                + (frac != roll.mem_fraction_static)
                + (servers != roll.num_servers)
            )
            rolls.append((d, cand))
    return rolls


def candidate_layouts(
    m: ModelShape, cluster: Cluster, train: TrainLayout, roll: RolloutLayout, work: Workload
) -> list[tuple[int, TrainLayout, RolloutLayout]]:
    """Layouts near the given one, each with a distance (how many settings differ)."""
    rolls = _rollout_candidates(cluster, roll)
    out: list[tuple[int, TrainLayout, RolloutLayout]] = []
    seen = set()
    for dt, t in _train_candidates(m, cluster, train, work):
        if t in seen:
            continue
        seen.add(t)
        for dr, r in rolls:
            out.append((dt + dr, t, r))
    return out


def nearest_fitting(
    m: ModelShape,
    cluster: Cluster,
    train: TrainLayout,
    roll: RolloutLayout,
    work: Workload,
    *,
    assume: Assumptions = DEFAULT_ASSUMPTIONS,
) -> Plan | None:
    """The fitting layout that changes the fewest settings (ties: the fastest step)."""
    best: tuple[int, float, Plan] | None = None
    for d, t, r in candidate_layouts(m, cluster, train, roll, work):
        if best is not None and d > best[0]:
            continue
        plan = make_plan(m, cluster, t, r, work, assume=assume)
        if not plan.fits:
            continue
        # among equally near layouts, one the trainer can run (no new CP) wins
        key = (d + 0.5 * (t.cp != train.cp), plan.time.total_s)
        if best is None or key < best[:2]:
            best = (key[0], plan.time.total_s, plan)
    return best[2] if best else None


def plan_config(
    cfg: Config,
    config_path: str | Path | None = None,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    gpu: str | None = None,
    assume: Assumptions = DEFAULT_ASSUMPTIONS,
) -> Plan:
    m = shape_from_config(cfg, config_path)
    cluster = cluster_from_config(cfg, nodes, gpus_per_node, gpu)
    try:
        choices = resolved_choices(
            replace_sp_for_tp1(cfg), assume.te_version, cluster.spec.compute_capability
        )
    except ValueError as e:  # e.g. model.fp8 with model.transformer_impl: local
        raise ConfigError(str(e)) from None
    train, roll = layouts_from_config(cfg, cluster, assume, choices)
    plan = make_plan(m, cluster, train, roll, workload_from_config(cfg), assume=assume)
    if cfg.rollout.engine != "sglang":
        plan.notes.append(
            f"rollout.engine = {cfg.rollout.engine}: the rollout figures assume SGLang servers "
            "laid out as rollout.sglang says"
        )
    if choices.build.precision.warning:
        plan.notes.append(f"on the cluster: {choices.build.precision.warning}")
    if train.fp8:
        plan.notes.append(
            f"model.fp8: {choices.build.precision.fp8_recipe} recipe on "
            f"{cluster.spec.name} with Transformer Engine {assume.te_version}; training "
            "weights counted in bf16 (an upper bound)"
        )
    return plan
