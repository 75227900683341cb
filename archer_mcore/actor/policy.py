"""The Megatron policy: what the RL loop calls to score and update the model.

    policy = MegatronPolicy.from_hf(hf_dir, PolicyConfig(model=cfg.model, parallel=..., ...))
    logp, ent = policy.compute_logprobs(batch)            # old log-probs, forward only
    ref = policy.compute_ref_logprobs(batch)              # frozen reference (KL)
    metrics = policy.train_step(batch_with_old_adv_ref, loss_cfg)
    for bucket in policy.export_hf_buckets(bucket_bytes): ...   # rollout weight sync
    policy.save_checkpoint(dir, extra_state) / policy.load_checkpoint(dir) -> extra_state

These are the methods of `actor.protocol.Policy`, through which the RL loop calls it;
`PolicyConfig` lives in `actor.policy_config`, checkpoints in `actor.checkpoint` (which
takes the policy as an argument and never imports this module).

SPMD: every rank calls every method. The scoring passes (`compute_logprobs`,
`compute_ref_logprobs`) take the whole batch, the same on every rank, and shard it
over data parallelism themselves (each DP rank runs the forward over 1/dp of the rows;
the results are all-gathered). `train_step` takes this data-parallel rank's share
(`policy.dp_rank` / `policy.dp_size` say which); ranks of one model replica (its
TP x PP ranks) must pass the same batch. Results come back on every rank. Shapes are
documented on `PolicyBatch`.

Gradient accumulation: micro-batches are formed by a token budget; each micro-batch
loss is sum-of-terms / N_global * dp (N_global = the mini-batch's units across all
data-parallel ranks: tokens for token-mean, responses for the seq-mean modes; counted
by `algo.losses.normalizer_units`, summed over ranks here), so after megatron DDP's
data-parallel *mean* the gradient is exactly that of the mini-batch loss, whatever the
micro-batch split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from archer_mcore.actor import kernel_dispatch
from archer_mcore.actor.checkpoint import load_checkpoint, save_checkpoint
from archer_mcore.actor.moe_load import RouterLoad
from archer_mcore.actor.policy_batch import (
    PolicyBatch,
    build_microbatches,
    plan_microbatches,
    scatter_rows,
)
from archer_mcore.actor.policy_config import PolicyConfig, resolve_policy_choices
from archer_mcore.algo.losses import (
    LossConfig,
    accumulation_normalizer,
    normalizer_units,
    policy_loss,
)
from archer_mcore.model.build import (
    build_gpt_model,
    ddp_config,
    output_weight,
    return_hidden_states,
)
from archer_mcore.model.fp8 import detect_environment
from archer_mcore.model.hf_config import ModelShape, shape_from_hf_config
from archer_mcore.model.hf_io import HFCheckpointReader
from archer_mcore.model.pipeline import MicroBatch, run_microbatches
from archer_mcore.model.weights import NamedTensors, iter_hf_buckets, load_hf_weights, unwrap
from archer_mcore.parallel.distributed import init_distributed


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def _comm_device() -> torch.device:
    """Where collective buffers live: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


class MegatronPolicy:
    """A megatron-core GPTModel with DDP, distributed optimizer, LR schedule and an
    optional frozen reference copy."""

    shape: ModelShape
    cfg: PolicyConfig

    def __init__(
        self, shape: ModelShape, cfg: PolicyConfig, hf_dir: str | Path | None = None
    ) -> None:
        from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.shape, self.cfg = shape, cfg
        if shape.is_moe and cfg.tp > 1 and not cfg.parallel.sequence_parallel:
            raise ValueError(
                "parallel.sequence_parallel must be true for an MoE model at "
                f"parallel.tensor_model_parallel_size = {cfg.tp} (megatron-core's "
                "MoELayer refuses to train with TP > 1 without sequence parallelism)"
            )
        self.choices = resolve_policy_choices(cfg, *detect_environment(), torch.cuda.is_available())
        self.kernel_path = self.choices.kernel_path
        kernel_dispatch.say_once(self.kernel_path)
        build = self.choices.build
        model, self.config, _ = build_gpt_model(shape, cfg.model, cfg.parallel, choices=build)
        if hf_dir is not None:
            load_hf_weights(model, HFCheckpointReader(hf_dir), shape)
        self.router_load = (
            RouterLoad(model, num_layers=shape.num_layers, num_experts=shape.num_experts,
                       top_k=shape.moe_top_k)
            if shape.is_moe
            else None
        )  # fmt: skip
        self.reference = None
        if cfg.with_reference:
            ref, _, _ = build_gpt_model(shape, cfg.model, cfg.parallel, choices=build)
            ref.load_state_dict(model.state_dict())
            ref.eval().requires_grad_(False)
            self.reference = ref
        if self.kernel_path.fused_lm_head and _ps().is_pipeline_last_stage():
            # The last stage hands over its final hidden states; the fused LM head
            # makes the entropies and log-probs from them and the output weight.
            for m in (model, self.reference):
                if m is not None:
                    return_hidden_states(m)

        o = cfg.optimizer
        dist_opt = cfg.parallel.use_distributed_optimizer
        self.ddp_config = ddp_config(build, cfg.parallel)
        self.model = DistributedDataParallel(
            config=self.config, ddp_config=self.ddp_config, module=model
        )
        self.model.broadcast_params()  # data-parallel replicas start identical (random init)
        dtype = self.config.params_dtype
        opt_cfg = OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            min_lr=o.min_lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            params_dtype=dtype,
            use_distributed_optimizer=dist_opt,
        )
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        decay = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else 10**9
        warmup = o.lr_warmup_steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if warmup > 0 else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(decay, warmup + 1),
            lr_decay_style=o.lr_schedule,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        self.config.no_sync_func = self.model.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.step = 0
        self.scored_rows = 0  # rows this rank has run a scoring forward over (diagnostics)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_hf(
        cls, source: str | Path | Mapping[str, Any], cfg: PolicyConfig, init_dist: bool = True
    ) -> MegatronPolicy:
        """From an HF model directory (config.json + safetensors), or from a config dict
        (random initialisation). Initialises torch.distributed and megatron's groups
        (TP, PP and, for MoE, EP = parallel.expert_model_parallel_size) unless
        `init_dist` is False (then they must exist already)."""
        if init_dist:
            init_distributed(
                cfg.tp,
                cfg.pp,
                cfg.seed,
                timeout_s=cfg.parallel.collective_timeout_s,
                ep=cfg.parallel.expert_model_parallel_size,
            )
        shape = shape_from_hf_config(source)
        hf_dir = None if isinstance(source, Mapping) else Path(source)
        return cls(shape, cfg, hf_dir)

    # ------------------------------------------------------------ topology
    @property
    def dp_rank(self) -> int:
        return _ps().get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return _ps().get_data_parallel_world_size()

    @property
    def is_last_stage(self) -> bool:
        return _ps().is_pipeline_last_stage()

    def _vocab_start(self) -> int:
        ps = _ps()
        v_local = self.shape.padded_vocab_size(ps.get_tensor_model_parallel_world_size())
        return (
            ps.get_tensor_model_parallel_rank()
            * v_local
            // ps.get_tensor_model_parallel_world_size()
        )

    # ------------------------------------------------------------ scoring
    def _token_stats(
        self, out: Tensor, mb: MicroBatch, model: torch.nn.Module
    ) -> tuple[Tensor, Tensor]:
        """(entropy, logprob) [b, Lm] of the micro-batch's response tokens; 0 where
        `mb.extras["mask"]` is False.

        `out` is the last stage's final hidden states [b, s, H] (after the final norm:
        the output layer hands its input over, see `_hidden_states_out`). The rows of
        the valid response tokens are taken first ([N, H], N <= b * s), and only they
        go through the output layer, with the output weight [V_pad / tp, H] of `model`:
        with `kernels.fused_lm_head` in the fused LM head (no logits tensor), else as
        one [N, V_pad / tp] logits tensor in the parameter dtype that the entropy /
        log-prob function reads and overwrites with its gradient. Per token this is
        the computation megatron's output layer + `_token_stats` on its logits did,
        without the [b, s, V] logits, their [s, b, V] -> [b, s, V] copy, the copy of
        the selected rows and its zero-filled [b, s, V] gradient.
        `self.kernel_path.mode` picks the Triton kernel or the torch reference."""
        pos, targets, mask = mb.extras["flat_pos"], mb.extras["targets"], mb.extras["mask"]
        b, lm = pos.shape
        keep = mask.reshape(-1).nonzero().squeeze(-1).cpu()  # valid positions of [b * Lm]
        empty = keep.numel() == 0
        if empty:  # one (masked) row, times 0 below, so the loss stays on the graph
            keep = torch.zeros(1, dtype=torch.long)
        # flat_pos indexes the output's rows x positions (one row when packed)
        idx = pos.reshape(-1)[keep].to(out.device)
        hidden = out.reshape(-1, out.shape[-1]).index_select(0, idx)  # [N, H]
        tokens = targets.reshape(-1)[keep].to(out.device)
        group = _ps().get_tensor_model_parallel_group()
        path = self.kernel_path
        head = (
            kernel_dispatch.lm_head_entropy_and_logprob
            if path.fused_lm_head
            else partial(
                kernel_dispatch.output_layer_entropy_and_logprob,
                chunk_rows=self.cfg.logprob_chunk_rows,
            )
        )
        ent_n, lp_n = head(
            hidden,
            output_weight(unwrap(model)),
            tokens,
            self.cfg.temperature,
            tp_group=group,
            vocab_start=self._vocab_start(),
            vocab_size=self.shape.vocab_size,
            mode=path.mode,
        )
        if empty:
            ent_n, lp_n = ent_n * 0, lp_n * 0
        at = keep.to(ent_n.device)
        ent = ent_n.new_zeros(b * lm).index_copy(0, at, ent_n)
        lp = lp_n.new_zeros(b * lm).index_copy(0, at, lp_n)
        return ent.reshape(b, lm), lp.reshape(b, lm)

    @contextmanager
    def _hidden_states_out(self, model: torch.nn.Module) -> Iterator[None]:
        """While scoring or training: the last stage's output layer hands its input
        (the final hidden states) over instead of computing logits for every position,
        so that `_token_stats` runs it on the response tokens only. With
        `kernels.fused_lm_head` this is permanent (set at construction); otherwise it
        holds for the duration of the block and the model computes logits again after
        it (for anyone calling the model directly)."""
        if self.kernel_path.fused_lm_head or not self.is_last_stage:
            yield
            return
        layer = unwrap(model).output_layer
        return_hidden_states(unwrap(model))
        try:
            yield
        finally:
            del layer.forward  # the instance attribute: the class's forward again

    def _microbatches(self, batch: PolicyBatch) -> list[MicroBatch]:
        """Token-budget micro-batches: packed sequences (`parallel.pack_sequences`) or
        padded rows, lengths rounded to the builder's multiple (SP: TP, FP8: x16)."""
        plan = plan_microbatches(
            batch.seq_lengths(),
            self.cfg.parallel.micro_batch_tokens,
            seq_multiple=self.choices.build.seq_multiple,
            pack=self.cfg.parallel.pack_sequences,
        )
        return build_microbatches(batch, plan)

    def _broadcast_from_last_stage(self, tensors: list[Tensor]) -> None:
        ps = _ps()
        if ps.get_pipeline_model_parallel_world_size() > 1:
            group = ps.get_pipeline_model_parallel_group()
            src = ps.get_pipeline_model_parallel_world_size() - 1
            for t in tensors:
                dist.broadcast(t, group=group, group_src=src)

    @torch.no_grad()
    def _score_rows(self, model: torch.nn.Module, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """(logprob, entropy) [b, L] fp32 of every row of `batch`, on this rank (no
        data-parallel split); the caller's device."""
        mbs = self._microbatches(batch)

        def collect(hidden: Tensor, mb: MicroBatch) -> tuple[Tensor, dict[str, Any]]:
            ent, lp = self._token_stats(hidden, mb, model)
            return hidden.new_zeros(()), {"entropy": ent, "logprob": lp}

        was_training = model.training
        model.eval()
        try:
            with self._hidden_states_out(model):
                outs = run_microbatches(model, mbs, collect, forward_only=True)
        finally:
            model.train(was_training)
        self.scored_rows += sum(len(mb.extras["rows"]) for mb in mbs)
        shape = batch.response_mask.shape
        dev = _comm_device()
        logp = torch.zeros(shape, dtype=torch.float32, device=dev)
        ent = torch.zeros(shape, dtype=torch.float32, device=dev)
        for mb, out in zip(mbs, outs):
            m = mb.extras["mask"].to(dev)
            rows = mb.extras["rows"].to(dev)
            scatter_rows(logp, rows, torch.where(m, out["logprob"].to(dev), 0.0))
            scatter_rows(ent, rows, torch.where(m, out["entropy"].to(dev), 0.0))
        self._broadcast_from_last_stage([logp, ent])
        return logp, ent

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """Score the whole batch (the same on every rank) with each data-parallel rank
        running the forward over its rows only (rows dp_rank, dp_rank + dp, ...), then
        all-gather the results over the data-parallel group."""
        dp, r = self.dp_size, self.dp_rank
        out_dev = batch.input_ids.device
        if dp == 1:
            logp, ent = self._score_rows(model, batch)
            return logp.to(out_dev), ent.to(out_dev)
        b, length = batch.response_mask.shape
        per = -(-b // dp)  # rows of the largest share
        dev = _comm_device()
        mine = torch.arange(r, b, dp)
        buf = torch.zeros(2, per, length, dtype=torch.float32, device=dev)
        if len(mine):  # every rank of this model replica has the same dp rank: all skip or none
            logp, ent = self._score_rows(model, batch.rows(mine))
            buf[0, : len(mine)], buf[1, : len(mine)] = logp, ent
        parts = [torch.empty_like(buf) for _ in range(dp)]
        dist.all_gather(parts, buf, group=_ps().get_data_parallel_group())
        full = torch.zeros(2, b, length, dtype=torch.float32, device=dev)
        for k, part in enumerate(parts):
            rows = torch.arange(k, b, dp, device=dev)
            full[:, rows] = part[:, : len(rows)]
        return full[0].to(out_dev), full[1].to(out_dev)

    def compute_logprobs(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """Current-policy (logprob, entropy) [B, L] fp32 of the response tokens, zero at
        invalid positions; forward only. `batch` is the whole batch, the same on every
        rank: each data-parallel rank scores 1/dp of its rows and the results are
        gathered, so every rank returns all B rows."""
        return self._score(self.model, batch)

    def compute_ref_logprobs(self, batch: PolicyBatch) -> Tensor:
        """Frozen reference policy's log-probs [B, L] fp32 (sharded like
        `compute_logprobs`: pass the whole batch on every rank)."""
        if self.reference is None:
            raise RuntimeError("this policy was built with with_reference=False")
        return self._score(self.reference, batch)[0]

    # ------------------------------------------------------------ training
    def _global_units(
        self, batch: PolicyBatch, mbs: list[MicroBatch], loss_cfg: LossConfig
    ) -> float:
        """The mini-batch's normalising units (`losses.normalizer_units`), summed over
        data-parallel ranks."""
        local = normalizer_units(
            batch.response_mask, loss_cfg, batch.selection, [mb.extras["mask"] for mb in mbs]
        )
        t = torch.tensor([local], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, group=_ps().get_data_parallel_group(with_context_parallel=True))
        return float(t.item())

    def train_step(self, batch: PolicyBatch, loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step on this mini-batch (old_logp and advantages required;
        ref_logp when the loss has a KL term). Returns metrics averaged over the
        mini-batch on every rank: loss, grad_norm, lr, and the loss function's metrics."""
        if batch.old_logp is None or batch.advantages is None:
            raise ValueError("train_step needs batch.old_logp and batch.advantages")
        mbs = self._microbatches(batch)
        normalizer = accumulation_normalizer(self._global_units(batch, mbs, loss_cfg), self.dp_size)

        def loss_fn(hidden: Tensor, mb: MicroBatch) -> tuple[Tensor, dict[str, Any]]:
            ent, lp = self._token_stats(hidden, mb, self.model)
            x = {k: (v.to(lp.device) if isinstance(v, Tensor) else v) for k, v in mb.extras.items()}
            loss, metrics = policy_loss(
                lp,
                x["old_logp"].float(),
                x["advantages"].float(),
                mask=x["mask"],
                entropy=ent,
                ref_logp=x["ref_logp"].float() if "ref_logp" in x else None,
                cfg=loss_cfg,
                normalizer=normalizer,
                selection=x.get("selection"),
                token_weights=x.get("token_weights"),
            )
            metrics = {k: v.detach().float() for k, v in metrics.items()}
            metrics["loss"] = loss.detach().float()
            return loss, metrics

        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.router_load is not None:
            self.router_load.reset()
        with self._hidden_states_out(self.model):
            outs = run_microbatches(self.model, mbs, loss_fn, forward_only=False)
        metrics = self._reduce_metrics(outs)  # the same on every rank
        if self.router_load is not None:  # MoE: expert load of this step's forwards
            metrics.update(self.router_load.metrics(_comm_device()))
        ok, grad_norm = self._optimizer_step(math.isfinite(metrics.get("loss", 0.0)))
        if ok:
            self.scheduler.step(increment=1)
        self.step += 1
        metrics["grad_norm"] = grad_norm
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["update_skipped"] = float(not ok)
        return metrics

    def _optimizer_step(self, loss_is_finite: bool) -> tuple[bool, float]:
        """megatron's `optimizer.step()` (clip by the global grad norm, then step), except
        that a non-finite loss or gradient norm skips the update: megatron itself only
        checks for inf/NaN through the fp16 loss scaler, so in fp32 or bf16 it would
        apply NaN gradients. A skipped update leaves parameters, optimizer state and
        (in the caller) the LR schedule untouched. `loss_is_finite` and the grad norm
        (reduced over the grad-stats group) agree on every rank, so all ranks skip
        together. Returns (updated, grad norm)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        if opt.prepare_grads():  # the fp16 loss scaler found inf/NaN
            grad_norm = float("nan")
        else:
            grad_norm = float(opt.get_grad_norm())
        if not (loss_is_finite and math.isfinite(grad_norm)):
            self.model.zero_grad_buffer()
            opt.zero_grad()
            return False, grad_norm
        for inner in getattr(opt, "chained_optimizers", [opt]):
            params = [] if getattr(inner, "is_stub_optimizer", False) else inner.get_parameters()
            if params and inner.config.clip_grad > 0.0:
                clip_grad_by_total_norm_fp32(
                    params,
                    max_norm=inner.config.clip_grad,
                    total_norm=grad_norm,
                    use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                )
        return bool(opt.step_with_ready_grads()), grad_norm

    def _reduce_metrics(self, outs: list[dict[str, Tensor]]) -> dict[str, float]:
        """loss: summed over micro-batches and DP ranks / dp (= the mini-batch loss);
        tokens/*: summed; the rest: means weighted by valid tokens."""
        ps = _ps()
        keys: list[str] = sorted(outs[0]) if outs else []
        obj = [keys]
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast_object_list(
                obj,
                group=ps.get_pipeline_model_parallel_group(),
                group_src=ps.get_pipeline_model_parallel_world_size() - 1,
            )
        keys = obj[0]
        vec = torch.zeros(len(keys) + 1, dtype=torch.float64, device=_comm_device())
        for out in outs:
            w = float(out.get("tokens/all", torch.tensor(1.0)))
            vec[-1] += w
            for i, k in enumerate(keys):
                v = float(out[k])
                vec[i] += v if (k == "loss" or k.startswith("tokens/")) else v * w
        self._broadcast_from_last_stage([vec])
        dist.all_reduce(vec, group=ps.get_data_parallel_group(with_context_parallel=True))
        vec = vec.cpu()
        total_w = max(float(vec[-1]), 1e-12)
        res = {}
        for i, k in enumerate(keys):
            if k == "loss":
                res[k] = float(vec[i]) / self.dp_size
            elif k.startswith("tokens/"):
                res[k] = float(vec[i])
            else:
                res[k] = float(vec[i]) / total_w
        return res

    # ------------------------------------------------------------ weights out
    def export_hf_buckets(
        self, bucket_bytes: int = 512 * 1024**2, dtype: torch.dtype | None = None
    ) -> Iterator[NamedTensors]:
        """HF-named full tensors in buckets of about `bucket_bytes` (collective over the
        model-parallel group; every rank yields the same buckets)."""
        return iter_hf_buckets(self.model, self.shape, bucket_bytes, dtype)

    def unwrapped(self) -> torch.nn.Module:
        return unwrap(self.model)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(
        self,
        ckpt_dir: str | Path,
        extra_state: Mapping[str, Any] | None = None,
        keep_last: int | None = 3,
        step: int | None = None,
    ) -> Path:
        """Save as `ckpt_dir/step_<step>` (default: this policy's optimizer-step count)."""
        return save_checkpoint(
            self, ckpt_dir, dict(extra_state or {}), keep_last=keep_last, step=step
        )

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore from a step directory, or a root's latest checkpoint; returns the
        extra state saved with it."""
        return load_checkpoint(self, ckpt_dir)
