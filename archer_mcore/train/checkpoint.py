"""Atomic, verifiable checkpoints of a `MegatronPolicy` with megatron dist_checkpointing.

Layout under a checkpoint root:

    root/step_00000042/dist/            megatron dist_checkpointing (torch_dist): model,
                                        optimizer (fully_reshardable), LR scheduler, step
    root/step_00000042/rng/rank_*.pt    per-rank RNG states (CPU, CUDA, megatron tracker,
                                        python)
    root/step_00000042/extra_state.pt   the caller's opaque dict (e.g. data position)
    root/step_00000042/MANIFEST.json    written last: step, layout, every file's size and
                                        CRC32
    root/latest                         name of the newest complete checkpoint

Saving writes everything into ``root/.tmp-step_N``, fsyncs it, writes the manifest and
only then renames the directory into place (and updates ``latest``), so a crash at any
point leaves either the previous checkpoints or a ``.tmp-*`` directory that is never
loaded. Loading verifies the manifest (presence, sizes, checksums) and raises
`CheckpointError` naming the problem instead of silently starting over; `--resume` picks
the newest checkpoint that verifies (`latest_valid_checkpoint`, which reports each
damaged one it skips). Pruning keeps the checkpoint just written and deletes only older
ones beyond `keep_last`. The frozen
reference model is not saved: it is rebuilt from the same HF weights at start-up.

Resharding: a checkpoint loads at any TP/PP/DP layout the model allows. The model
weights are megatron ShardedTensors in model space (each names its slice of the full
tensor, so torch_dist reassembles them for the loading layout); the distributed
optimizer's state is saved in megatron's ``fully_reshardable`` format (Adam moments and
fp32 main weights laid out like the model parameters, not like this run's flat DP
buffers; megatron-core 0.16.1, ``DistributedOptimizer.sharded_param_state_fully_reshardable``);
the vocabulary is padded to a multiple of 128 that does not depend on TP
(`ModelShape.padded_vocab_size`). The per-rank RNG states are restored only when the
layout (world size, TP, PP) is the one saved; otherwise the run keeps its freshly
seeded generators and logs that it did so. Checkpoints written before resharding (no
``optimizer_sharding`` in the manifest: dp_reshardable optimizer state, vocabulary padded
to 128 * TP) load only at their own layout, and only when that padding agrees with
today's; anything else is a CheckpointError saying which layout to use.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from archer_mcore.parallel import cpu_compat

if TYPE_CHECKING:
    from archer_mcore.train.policy import MegatronPolicy

MANIFEST = "MANIFEST.json"
LATEST = "latest"
FORMAT_VERSION = 1
OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
# Checkpoints without "optimizer_sharding" in their manifest were written with this one.
LEGACY_OPTIM_SHARDING = "dp_reshardable"
LEGACY_VOCAB_MULTIPLE = 128  # legacy checkpoints padded the vocabulary to 128 * TP

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _crc32(path: Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
    }


# ------------------------------------------------------------------ verification
def verify_checkpoint(ckpt: str | Path, checksums: bool = True) -> dict[str, Any]:
    """Check a step directory against its manifest; returns the manifest.

    Raises CheckpointError naming the directory and the first problem found."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist")
    if ckpt.name.startswith(".tmp-"):
        raise CheckpointError(f"checkpoint {ckpt} is an unfinished save (a crash interrupted it)")
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        int(manifest["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is unreadable ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {ckpt}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    for rel, (size, crc) in files.items():
        p = ckpt / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: file {rel} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: file {rel} has {p.stat().st_size} bytes, the manifest says {size}"
            )
        if checksums and _crc32(p) != crc:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: file {rel} fails its CRC32 check")
    return manifest


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names (else the highest-numbered step directory with a
    manifest); None when the root holds no finished checkpoint at all. Unfinished
    ``.tmp-*`` saves are ignored. Does not verify: `load_checkpoint` does."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        if name:
            return root / name
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())
    return steps[-1] if steps else None


def latest_valid_checkpoint(
    root: str | Path, checksums: bool = True, report: Any = None
) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`: the one
    ``latest`` names first, then the step directories from the highest step down.
    Each damaged one is skipped and passed to `report(step_dir, reason)` (when given).
    None when the root holds no checkpoint at all; CheckpointError (listing every
    reason) when it holds some and none is valid."""
    root = Path(root)
    if not root.is_dir():
        return None
    candidates: list[Path] = []
    pointer = root / LATEST
    if pointer.is_file() and pointer.read_text().strip():
        candidates.append(root / pointer.read_text().strip())
    for p in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        if p not in candidates:
            candidates.append(p)
    skipped: list[str] = []
    for p in candidates:
        try:
            verify_checkpoint(p, checksums=checksums)
        except CheckpointError as exc:
            skipped.append(str(exc))
            if report is not None:
                report(p, str(exc))
            continue
        return p
    if skipped:
        raise CheckpointError(
            f"no valid checkpoint under {root}; every one is damaged: " + "; ".join(skipped)
        )
    return None


def resolve_checkpoint(ckpt: str | Path, checksums: bool = True) -> tuple[Path, dict[str, Any]]:
    """A step directory, or a root (then its latest checkpoint), verified: returns
    (step_dir, manifest). Raises CheckpointError if there is none or it is damaged; it
    never falls back to an older checkpoint or to a fresh start on its own."""
    ckpt = Path(ckpt)
    if (ckpt / MANIFEST).is_file() or ckpt.name.startswith(("step_", ".tmp-")):
        step_dir = ckpt
    else:
        found = find_latest_checkpoint(ckpt)
        if found is None:
            raise CheckpointError(f"no checkpoint under {ckpt}")
        step_dir = found
    return step_dir, verify_checkpoint(step_dir, checksums=checksums)


def _reason(exc: BaseException) -> str:
    """One line for an exception; for torch's CheckpointException (whose str holds
    every rank's traceback) the first failing rank's exception."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _) = next(iter(sorted(exc.failures.items(), key=lambda kv: kv[0])))
        exc = inner
        prefix = f"rank {rank}: "
    else:
        prefix = ""
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{prefix}{type(exc).__name__}: {text}"


# ------------------------------------------------------------------ RNG
def _rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state: dict[str, Any] = {
        "cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


# ------------------------------------------------------------------ save / load
def _ensure_adam_state(optimizer: Any) -> None:
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


def _restore_adam_steps(optimizer: Any, loaded_optimizer_state: Any) -> None:
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


@contextmanager
def _keep_adam_step_on_reshardable_load(optimizer: Any) -> Iterator[None]:
    """While loading ``fully_reshardable`` optimizer state with plain torch Adam (no
    Apex/TE): megatron-core 0.16.1's
    ``DistributedOptimizer.load_parameter_state_from_fully_reshardable`` leaves the
    per-parameter "step" out of the tensors it hands to
    ``_set_main_param_and_optimizer_states``, which copies every key of the torch Adam
    state (which has "step") and so fails with KeyError 'step'. Here the parameter's
    current step (set from the saved param groups by ``load_state_dict``) is passed
    along unchanged; `_restore_adam_steps` then sets the saved count."""
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


def _reshard_fields(policy: MegatronPolicy) -> dict[str, Any]:
    """The manifest fields that say how this checkpoint's state is laid out: the
    optimizer's sharding type and the padded vocabulary (rows of the full embedding)."""
    return {
        "optimizer_sharding": OPTIM_SHARDING["distrib_optim_sharding_type"],
        "padded_vocab": policy.shape.padded_vocab_size(_layout()["tp"]),
    }


def _check_loadable(policy: MegatronPolicy, step_dir: Path, manifest: dict[str, Any]) -> str:
    """The optimizer sharding type to load `step_dir` with; CheckpointError when this
    run's layout cannot read it (a legacy checkpoint at another layout, or one whose
    padded vocabulary differs from this model's)."""
    layout = _layout()
    saved = {k: manifest.get(k) for k in layout}
    padded = policy.shape.padded_vocab_size(layout["tp"])
    sharding = manifest.get("optimizer_sharding")
    if sharding is None:  # written before checkpoints resharded
        if saved != layout:
            raise CheckpointError(
                f"checkpoint {step_dir} was written in the older format that cannot change "
                f"layout (dp_reshardable optimizer state, vocabulary padded to 128 * TP): load it "
                f"with world_size={saved['world_size']} TP={saved['tp']} PP={saved['pp']} "
                f"(this run has world_size={layout['world_size']} TP={layout['tp']} "
                f"PP={layout['pp']}); a checkpoint saved from there reshards"
            )
        m = LEGACY_VOCAB_MULTIPLE * int(saved["tp"])
        legacy_padded = -(-policy.shape.vocab_size // m) * m
        if legacy_padded != padded:
            raise CheckpointError(
                f"checkpoint {step_dir} was written in the older format, with the vocabulary "
                f"padded to {legacy_padded} rows (a multiple of 128 * TP={saved['tp']}); this "
                f"version pads it to {padded} (a multiple of 128), so it cannot be loaded"
            )
        return LEGACY_OPTIM_SHARDING
    if manifest.get("padded_vocab") not in (None, padded):
        raise CheckpointError(
            f"checkpoint {step_dir} has a vocabulary padded to {manifest['padded_vocab']} rows; "
            f"this model pads vocab_size={policy.shape.vocab_size} to {padded}"
        )
    return str(sharding)


def _sharded_state(
    policy: MegatronPolicy, is_loading: bool, sharding: str | None = None
) -> dict[str, Any]:
    metadata = OPTIM_SHARDING if sharding is None else {"distrib_optim_sharding_type": sharding}
    # Saving needs it too: before the first optimizer step (a run stopped, or whose
    # first steps had nothing to train on) megatron's state dict asserts on the missing
    # Adam step count. Zero state is what torch Adam would create lazily anyway.
    _ensure_adam_state(policy.optimizer)
    model = policy.unwrapped()
    model_sd = model.sharded_state_dict()
    return {
        "model": model_sd,
        "optimizer": policy.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=metadata
        ),
        "scheduler": policy.scheduler.state_dict(),
        "step": policy.step,
    }


def _save_strategy():
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

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:  # type: ignore[override]
            sd, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_to_pyt_state_dict(sd, False)
            writer = FileSystemWriter(
                str(checkpoint_dir), single_file_per_rank=True, sync_files=True, thread_count=1
            )
            planner = MCoreSavePlanner(
                dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
            )
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    return SyncTorchDistSaveStrategy("torch_dist", 1)


def _publish(tmp: Path, final: Path) -> None:
    """The commit point of a save: rename the finished directory into place."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(root: Path, keep_last: int | None, current: Path) -> None:
    """Delete unfinished saves, and finished checkpoints older than `current` (the one
    just written) beyond the newest `keep_last` (counting `current`). `current` itself
    is never deleted, nor are higher-numbered directories (left by a run that was
    resumed from an older checkpoint; the run replaces them as it reaches their steps)."""
    for p in root.glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last is None or keep_last <= 0:
        return
    older = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name < current.name)
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    policy: MegatronPolicy,
    root: str | Path,
    extra_state: dict[str, Any],
    keep_last: int | None = 3,
    step: int | None = None,
) -> Path:
    """Collective: save under `root` as step `step` (default: `policy.step`, the count of
    optimizer steps; the RL loop passes its own step), atomically; keep the newest
    `keep_last` checkpoints (None: all). `extra_state` must be torch.load-able with
    weights_only=True (tensors, numbers, strings, lists, dicts). Returns the step dir."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    step = policy.step if step is None else int(step)
    name = step_dir_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    _barrier()
    state = _sharded_state(policy, is_loading=False)
    reshard_fields = _reshard_fields(policy)
    with cpu_compat.suspended():
        dist_checkpointing.save(state, str(tmp / "dist"), sharded_strategy=_save_strategy())
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(
            {"step": step, "policy_step": policy.step, "extra": extra_state},
            tmp / "extra_state.pt",
        )
    _barrier()
    _fsync_tree(tmp)  # every rank: its own writes are durable before the commit
    _barrier()
    if rank == 0:
        files = {}
        for dirpath, _, names in os.walk(tmp):
            for n in names:
                p = Path(dirpath) / n
                files[str(p.relative_to(tmp))] = [p.stat().st_size, _crc32(p)]
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            **_layout(),
            **reshard_fields,
            "files": files,
        }
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        _publish(tmp, final)
        _write_atomic(root / LATEST, name)
        _prune(root, keep_last, final)
    _barrier()
    return final


def load_checkpoint(
    policy: MegatronPolicy, ckpt: str | Path, checksums: bool = True
) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler, step and RNG from a step
    directory, or from the latest checkpoint when `ckpt` is a root. Returns the
    caller's extra state. Raises CheckpointError for a missing/partial/corrupt one.

    The checkpoint may have been saved at another TP/PP/DP layout (see the module
    docstring); the per-rank RNG states are then left as this run seeded them, and
    rank 0 logs that they were."""
    from megatron.core import dist_checkpointing

    step_dir, manifest = resolve_checkpoint(ckpt, checksums)
    sharding = _check_loadable(policy, step_dir, manifest)
    layout = _layout()
    same_layout = all(manifest.get(k) == v for k, v in layout.items())
    rank = _rank()
    rng_file = step_dir / "rng" / f"rank_{rank:05d}.pt"
    state = _sharded_state(policy, is_loading=True, sharding=sharding)
    try:
        with cpu_compat.suspended():
            loaded = dist_checkpointing.load(state, str(step_dir / "dist"))
        extra = torch.load(step_dir / "extra_state.pt", weights_only=True)
        rng = torch.load(rng_file, weights_only=False) if same_layout else None
    except (Exception, CheckpointException) as e:  # manifest-consistent but unloadable
        # (torch's CheckpointException, e.g. for a model of another shape, derives from
        # BaseException and would escape `except Exception`)
        raise CheckpointError(f"checkpoint {step_dir} could not be loaded: {_reason(e)}") from e
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
        policy.unwrapped().load_state_dict(loaded["model"])
        with _keep_adam_step_on_reshardable_load(policy.optimizer):
            policy.optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_steps(policy.optimizer, loaded["optimizer"])
    policy.scheduler.load_state_dict(loaded["scheduler"])
    policy.step = int(loaded["step"])
    if int(extra["step"]) != int(manifest["step"]) or policy.step != int(
        extra.get("policy_step", extra["step"])
    ):
        raise CheckpointError(
            f"checkpoint {step_dir}: step mismatch between manifest, state and extra state"
        )
    if rng is not None:
        _set_rng_state(rng)
    elif rank == 0:
        log.warning(
            "checkpoint %s was saved at world_size=%s TP=%s PP=%s and is resumed at "
            "world_size=%s TP=%s PP=%s: model and optimizer state resharded; the per-rank "
            "RNG states are not restored (this run's seeded generators are kept)",
            step_dir,
            manifest.get("world_size"),
            manifest.get("tp"),
            manifest.get("pp"),
            layout["world_size"],
            layout["tp"],
            layout["pp"],
        )
    _barrier()
    return extra["extra"]
