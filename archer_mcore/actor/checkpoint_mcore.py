"""Workarounds around megatron-core 0.16.1's dist_checkpointing and distributed
optimizer that `actor.checkpoint` saves and loads through: a synchronous torch_dist
writer that reports each rank's files, read-plan verification of shard files, and the
Adam state and step counts megatron's torch-Adam path (no Apex/TE) gets wrong. Each
names the megatron function it works around; none knows the policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from archer_mcore.actor.checkpoint_store import CheckpointError, LoadVerification


# ------------------------------------------------------------------ save writer
def save_strategy() -> Any:
    """megatron's torch_dist format, written synchronously by torch.distributed.checkpoint's
    plain FileSystemWriter. megatron's own writer (FileSystemWriterAsync) starts a
    spawn-context multiprocessing Manager plus forked writer processes even for a
    synchronous save, and that hangs in processes that are themselves spawned
    workers with the CPU layer active; the files written here are the same DCP format
    that megatron's torch_dist loader reads."""
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class RecordingWriter(FileSystemWriter):
        """Remembers the files this rank's write_data wrote (relative paths)."""

        written: tuple[str, ...] = ()

        def write_data(self, plan, planner):  # type: ignore[no-untyped-def]
            fut = super().write_data(plan, planner)
            self.written = tuple(sorted({r.storage_data.relative_path for r in fut.wait()}))
            return fut

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        written: tuple[str, ...] = ()  # this rank's shard files, relative to checkpoint_dir

        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:  # type: ignore[override]
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_to_pyt_state_dict(sd, False)
            writer = RecordingWriter(
                str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1
            )
            planner = MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            )
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)
            self.written = writer.written

    return SyncTorchDistSaveStrategy("torch_dist", 1)


# ------------------------------------------------------------------ verified reads
@contextlib.contextmanager
def verified_reads(
    ckpt: Path, files: Mapping[str, Any], checksums: bool, record: LoadVerification
) -> Iterator[None]:
    """Within the block, every torch_dist read megatron-core (0.16.1) makes first
    verifies the shard files in this rank's read plan against the manifest.

    megatron's TorchDistLoadShardedStrategy.load gets its storage reader from
    ``megatron.core.dist_checkpointing.strategies.torch._get_filesystem_reader``; the
    reader's ``read_data(plan, planner)`` receives the rank's final read plan, whose
    items name their files through ``reader.storage_data[item.storage_index]``
    (torch.distributed.checkpoint.filesystem.FileSystemReader). The factory is wrapped
    for the block so that ``read_data`` checks those files before reading them."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    make = mcore_torch._get_filesystem_reader

    def make_verifying(checkpoint_dir: Any, cache_metadata: bool = False) -> Any:
        reader = make(checkpoint_dir, cache_metadata)
        read = reader.read_data

        def read_data(plan: Any, planner: Any) -> Any:
            rels = {
                f"dist/{reader.storage_data[item.storage_index].relative_path}"
                for item in plan.items
            }
            record.check(ckpt, files, rels, checksums)
            return read(plan, planner)

        reader.read_data = read_data
        return reader

    mcore_torch._get_filesystem_reader = make_verifying
    try:
        yield
    finally:
        mcore_torch._get_filesystem_reader = make


# ------------------------------------------------------------------ Adam state
def ensure_adam_state(optimizer: Any) -> None:
    """Give every parameter without one a (zero) Adam state, as torch Adam would on its
    first step: with plain torch Adam (no Apex/TE) megatron reads the step count from
    the existing state while building the sharded state dict (to save, or to load into
    a fresh optimizer), and a fresh optimizer has none."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p.data)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def restore_adam_steps(optimizer: Any, loaded_optimizer_state: Any) -> None:
    """Give every parameter its own Adam step tensor holding the saved step count.

    megatron's DistributedOptimizer, on the torch-Adam path (no Apex/TE), (1) assigns one
    shared step tensor to every parameter, which torch Adam then increments once per
    parameter per step, and (2) copies the dp_reshardable per-parameter "step" over it
    from the placeholder state, losing the saved count. The count it saved in the
    param groups is the right one."""
    inner = (
        loaded_optimizer_state.get("optimizer", {})
        if isinstance(loaded_optimizer_state, dict)
        else {}
    )
    groups = inner.get("param_groups", []) if isinstance(inner, dict) else []
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) > 1:
        raise CheckpointError(f"optimizer param groups disagree on the step count: {sorted(steps)}")
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                value = float(next(iter(steps))) if steps else float(state["step"])
                state["step"] = torch.tensor(value, dtype=state["step"].dtype)


@contextlib.contextmanager
def keep_adam_step_on_reshardable_load(optimizer: Any) -> Iterator[None]:
    """While loading ``fully_reshardable`` optimizer state with plain torch Adam (no
    Apex/TE): megatron-core 0.16.1's
    ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` leaves the
    per-parameter "step" out of the tensors it hands to
    ``_set_main_param_and_optimizer_states``, which copies every key of the torch Adam
    state (which has "step") and so fails with KeyError 'step'. Here the parameter's
    current step (set from the saved param groups by ``load_state_dict``) is passed
    along unchanged; `restore_adam_steps` then sets the saved count."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if setter is None or not hasattr(opt, "model_param_group_index_map"):
            continue

        def with_step(model_param: Any, tensors: dict[str, Any], _opt=opt, _set=setter) -> Any:
            group, order = _opt.model_param_group_index_map[model_param]
            main = _opt.optimizer.param_groups[group]["params"][order]
            step = _opt.optimizer.state.get(main, {}).get("step")
            if "step" not in tensors and isinstance(step, torch.Tensor):
                tensors = {**tensors, "step": step.clone()}
            return _set(model_param, tensors)

        opt._set_main_param_and_optimizer_states = with_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class's method
