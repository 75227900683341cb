"""Workarounds around megatron-core 0.16.1's dist_checkpointing and distributed
optimizer that `actor.checkpoint` saves and loads through: a synchronous torch_dist
writer that reports each rank's files, read-plan verification of shard files, data-only
reads of every file megatron and torch.distributed.checkpoint load, and the Adam state
and step counts megatron's torch-Adam path (no Apex/TE) gets wrong. Each names the
megatron function it works around; none knows the policy.

Data-only reads (nothing in a checkpoint can run code when it is loaded). On the paths
megatron-core 0.16.1 takes for a torch_dist checkpoint, four reads unpickle:

- ``dist/common.pt`` (``TorchCommonLoadStrategy.load_common``: ``torch.load`` without
  ``weights_only``, so its default, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns
  off): loaded by `data_only_load_strategies`'s common strategy with
  ``weights_only=True``;
- ``dist/.metadata`` (torch's ``FileSystemReader.read_metadata``: a plain
  ``pickle.load``): read by `load_dcp_metadata`, an unpickler that admits only the
  metadata's own dataclasses, torch.Size, dtypes, layouts and paths;
- the byte objects in the shard files (megatron's ShardedObjects; torch's
  ``DefaultLoadPlanner.load_bytes``: ``torch.load(weights_only=False)``): loaded with
  ``weights_only=True`` by the planner hook of `verified_reads`;
- the tensors in the shard files: torch loads them with ``weights_only=True``; a
  refusal there is named with its file.

``dist/metadata.json`` (plain JSON) is checked by `check_dist_format` first, and the
strategies are pinned to torch_dist / torch so that it cannot select another loader.
A file refused on any of these is a CheckpointError naming it.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from archer_mcore.actor.checkpoint_store import (
    CheckpointError,
    LoadVerification,
    load_data_file,
    load_json_file,
    not_data_error,
)


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


# ------------------------------------------------------------------ data-only reads
#: (module, name) of every global a torch.distributed.checkpoint ``.metadata`` pickle
#: (torch 2.13) names; torch dtypes (``torch.float32`` ...) are admitted besides.
DCP_METADATA_GLOBALS = frozenset(
    [
        *(
            ("torch.distributed.checkpoint.metadata", n)
            for n in (
                "Metadata",
                "MetadataIndex",
                "StorageMeta",
                "TensorProperties",
                "TensorStorageMetadata",
                "BytesStorageMetadata",
                "ChunkStorageMetadata",
                "_MEM_FORMAT_ENCODING",
            )
        ),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    ]
)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint metadata and nothing else: any other
    global (a function to call, a class to build) is refused before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not checkpoint metadata")


def load_dcp_metadata(ckpt: Path, rel: str, raw: bytes | None = None) -> Any:
    """The torch.distributed.checkpoint ``Metadata`` in ckpt/rel (or in `raw`, that
    file's bytes), unpickled with only its own classes admitted; CheckpointError naming
    the file for anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        if raw is None:
            raw = (ckpt / rel).read_bytes()
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as exc:
        raise not_data_error(ckpt, rel, exc) from None
    except Exception as exc:  # a truncated or garbled pickle fails in many ways
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} is unreadable ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} holds a {type(metadata).__name__}, not "
            "torch.distributed.checkpoint metadata"
        )
    return metadata


def check_dist_format(ckpt: Path) -> None:
    """``dist/metadata.json`` is the JSON megatron writes for torch_dist / torch (it
    picks megatron's loaders; `data_only_load_strategies` pins them); CheckpointError
    naming it otherwise."""
    rel = "dist/metadata.json"
    config = load_json_file(ckpt, rel)
    backends = (config.get("sharded_backend"), config.get("common_backend"))
    if backends != ("torch_dist", "torch"):
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} names backends {backends}; archer writes and "
            "reads ('torch_dist', 'torch') only"
        )


def data_only_load_strategies(ckpt: Path) -> tuple[Any, Any]:
    """(sharded, common) load strategies for ``dist_checkpointing.load``: megatron's
    torch_dist one, and its torch common one with ``common.pt`` loaded data-only."""
    from megatron.core.dist_checkpointing.strategies.common import (
        COMMON_STATE_FNAME,
        TorchCommonLoadStrategy,
    )
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    class DataOnlyCommonLoadStrategy(TorchCommonLoadStrategy):
        """``common.pt`` through ``torch.load(weights_only=True)``."""

        def load_common(self, checkpoint_dir: str | Path) -> Any:
            rel = os.path.relpath(Path(checkpoint_dir) / COMMON_STATE_FNAME, ckpt)
            return load_data_file(ckpt, rel)

        def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Any) -> Any:
            # torch_dist keeps sharded objects in its shard files (read by the planner
            # hook of `verified_reads`); megatron asks the common strategy for them
            # only with a sharded strategy that cannot.
            raise CheckpointError(
                f"checkpoint {ckpt}: separate sharded-object files are not read (archer "
                "saves torch_dist checkpoints, which hold them in their shard files)"
            )

    return TorchDistLoadShardedStrategy(), DataOnlyCommonLoadStrategy()


def _data_only_load_bytes(planner: Any, reader: Any, ckpt: Path, rel_dir: str) -> Any:
    """A ``planner.load_bytes`` that does what torch's ``DefaultLoadPlanner.load_bytes``
    does (torch 2.13), with the bytes loaded by ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint._traverse import set_element

    def load_bytes(read_item: Any, value: Any) -> None:
        rel = f"{rel_dir}/{reader.storage_data[read_item.storage_index].relative_path}"
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise not_data_error(ckpt, rel, exc) from None
        fqn = read_item.dest_index.fqn
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj

    return load_bytes


def _data_only_read_metadata(reader: Any, ckpt: Path, rel_dir: str) -> Any:
    """A ``reader.read_metadata`` (torch 2.13's ``FileSystemReader.read_metadata``, and
    megatron's caching one) that unpickles with `load_dcp_metadata`. The file is read
    and checked here, before torch's loader starts: torch's ``_load_state_dict`` logs a
    failed ``read_metadata`` with its traceback and then tries per-rank metadata files,
    which torch_dist checkpoints do not have. Every call unpickles the checked bytes
    anew (a fresh object, as torch's reader returns)."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    rel = f"{rel_dir}/.metadata"
    raw = (ckpt / rel).read_bytes()
    load_dcp_metadata(ckpt, rel, raw)  # raises now, outside torch's loader

    def read_metadata(*args: Any, **kwargs: Any) -> Any:
        metadata = load_dcp_metadata(ckpt, rel, raw)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = reader.load_id
        return metadata

    return read_metadata


# ------------------------------------------------------------------ verified reads
@contextlib.contextmanager
def verified_reads(
    ckpt: Path, files: Mapping[str, Any], checksums: bool, record: LoadVerification
) -> Iterator[None]:
    """Within the block, every torch_dist read megatron-core (0.16.1) makes first
    verifies the shard files in this rank's read plan against the manifest, and reads
    only data: the metadata through `load_dcp_metadata`, byte objects with
    ``torch.load(weights_only=True)``.

    megatron's TorchDistLoadShardedStrategy.load gets its storage reader from
    ``megatron.core.dist_checkpointing.strategies.torch._get_filesystem_reader``; the
    reader's ``read_data(plan, planner)`` receives the rank's final read plan, whose
    items name their files through ``reader.storage_data[item.storage_index]``
    (torch.distributed.checkpoint.filesystem.FileSystemReader). The factory is wrapped
    for the block so that ``read_metadata`` reads data only and ``read_data`` checks
    the plan's files before reading them, with the planner's ``load_bytes`` replaced."""
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    make = mcore_torch._get_filesystem_reader

    def make_verifying(checkpoint_dir: Any, cache_metadata: bool = False) -> Any:
        reader = make(checkpoint_dir, cache_metadata)
        rel_dir = os.path.relpath(checkpoint_dir, ckpt)
        read = reader.read_data
        reader.read_metadata = _data_only_read_metadata(reader, ckpt, rel_dir)

        def read_data(plan: Any, planner: Any) -> Any:
            rels = {
                f"{rel_dir}/{reader.storage_data[item.storage_index].relative_path}"
                for item in plan.items
            }
            record.check(ckpt, files, rels, checksums)
            planner.load_bytes = _data_only_load_bytes(planner, reader, ckpt, rel_dir)
            try:
                return read(plan, planner)
            except pickle.UnpicklingError as exc:  # a tensor record that is not data
                raise not_data_error(ckpt, ", ".join(sorted(rels)), exc) from None

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
