"""Save and load a policy's state with megatron dist_checkpointing, atomically and
verified: model, optimizer, LR scheduler, step, per-rank RNG states and the caller's
extra state. Files, names, checksums and resolution live in `actor.checkpoint_store`;
the megatron-core workarounds in `actor.checkpoint_mcore`.

The policy is passed in (`CheckpointablePolicy`, which `actor.policy.CheckpointablePolicy`
satisfies): this module never imports the policy, the policy calls into it.

Saving: every rank writes its torch_dist shards and RNG file into ``root/.tmp-step_N``
and checksums what it wrote; rank 0 writes the manifest and publishes the directory
(see `checkpoint_store`). Loading: each rank verifies only what it reads: the shared
small files, its own RNG file, and the shard files in its torch_dist read plan (checked
as the storage reader is handed the plan); a problem on any rank fails the load on all.
The frozen reference model is not saved: it is rebuilt from the same HF weights at
start-up.

Nothing loaded runs code: the RNG and extra-state files are loaded with
``weights_only=True`` (`checkpoint_store.load_data_file`), megatron's files through
the data-only reads of `checkpoint_mcore` (common.pt, the torch_dist metadata and the
byte objects in the shard files); a file that would run code is a CheckpointError
naming it. A save that fails to write (disk full, I/O error, no permission) on any rank
is a `CheckpointSaveError` on every rank: one line naming the path and the newest
checkpoint still valid; the unfinished ``.tmp-step_N`` is removed.

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

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from archer_mcore.actor.checkpoint_mcore import (
    check_dist_format,
    data_only_load_strategies,
    ensure_adam_state,
    keep_adam_step_on_reshardable_load,
    restore_adam_steps,
    save_strategy,
    verified_reads,
)
from archer_mcore.actor.checkpoint_store import (
    LATEST,
    CheckpointError,
    LoadVerification,
    _barrier,
    _fsync_file,
    _prune,
    _publish,
    _rank,
    _write_atomic,
    latest_valid_checkpoint,
    load_data_file,
    resolve_checkpoint,
    step_dir_name,
    verify_checkpoint,
    write_manifest,
)
from archer_mcore.model.hf_config import ModelShape
from archer_mcore.parallel import cpu_compat
from archer_mcore.utils.safe_files import remove_entry

OPTIM_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
# Checkpoints without "optimizer_sharding" in their manifest were written with this one.
LEGACY_OPTIM_SHARDING = "dp_reshardable"
LEGACY_VOCAB_MULTIPLE = 128  # legacy checkpoints padded the vocabulary to 128 * TP
#: Files every rank reads on load (when the manifest lists them): the caller's extra
#: state, and megatron's common state, its format metadata and the torch_dist metadata.
SHARED_READS = ("extra_state.pt", "dist/common.pt", "dist/metadata.json", "dist/.metadata")

log = logging.getLogger(__name__)
_E = TypeVar("_E", bound=BaseException)


class CheckpointablePolicy(Protocol):
    """What a checkpoint saves and restores of a policy (`CheckpointablePolicy` has it all):
    its model shape, megatron optimizer and LR scheduler, optimizer-step count, and the
    bare model (no DDP wrapper)."""

    shape: ModelShape
    optimizer: Any  # megatron-core MegatronOptimizer (DistributedOptimizer or chained)
    scheduler: Any  # megatron-core OptimizerParamScheduler
    step: int

    def unwrapped(self) -> torch.nn.Module: ...


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "ep": ps.get_expert_model_parallel_world_size(),
    }


def _fail_together(error: str | None) -> None:
    """Collective: if any rank found a problem, raise CheckpointError on every rank (its
    own message, or the first failing rank's)."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    if error:
        raise CheckpointError(error)
    for r, e in enumerate(errors):
        if e:
            raise CheckpointError(f"rank {r}: {e}")


last_load_verification = LoadVerification()


def _wrapped(exc: BaseException, kind: type[_E], depth: int = 0) -> _E | None:
    """The exception of type `kind` that `exc` is or wraps, if any: torch's
    CheckpointException holds each rank's failure; causes and contexts are followed."""
    if isinstance(exc, kind):
        return exc
    if depth > 8:
        return None
    inner: list[BaseException] = []
    if isinstance(exc, CheckpointException):
        inner += [e for _, (e, _) in sorted(exc.failures.items(), key=lambda kv: kv[0])]
    inner += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    for e in inner:
        found = _wrapped(e, kind, depth + 1)
        if found is not None:
            return found
    return None


def _checkpoint_error_in(exc: BaseException) -> CheckpointError | None:
    """A CheckpointError that `exc` is or wraps (a rank's failure inside torch's
    CheckpointException, or a cause/context), if any."""
    return _wrapped(exc, CheckpointError)


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


# ------------------------------------------------------------------ layouts
def _reshard_fields(policy: CheckpointablePolicy) -> dict[str, Any]:
    """The manifest fields that say how this checkpoint's state is laid out: the
    optimizer's sharding type and the padded vocabulary (rows of the full embedding)."""
    return {
        "optimizer_sharding": OPTIM_SHARDING["distrib_optim_sharding_type"],
        "padded_vocab": policy.shape.padded_vocab_size(_layout()["tp"]),
    }


def _check_loadable(policy: CheckpointablePolicy, step_dir: Path, manifest: dict[str, Any]) -> str:
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
    policy: CheckpointablePolicy, is_loading: bool, sharding: str | None = None
) -> dict[str, Any]:
    metadata = OPTIM_SHARDING if sharding is None else {"distrib_optim_sharding_type": sharding}
    # Saving needs it too: before the first optimizer step (a run stopped, or whose
    # first steps had nothing to train on) megatron's state dict asserts on the missing
    # Adam step count. Zero state is what torch Adam would create lazily anyway.
    ensure_adam_state(policy.optimizer)
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


# ------------------------------------------------------------------ save / load
class CheckpointSaveError(CheckpointError):
    """A save that failed (disk full, I/O error, no permission): nothing of it was
    published; the message names the path and the newest checkpoint still valid."""


class _WriteFailed(Exception):
    """Where a save failed: the path it was writing and the error."""

    def __init__(self, path: Path, error: BaseException) -> None:
        super().__init__(f"{path}: {error}")
        self.path, self.error = path, error


def _first_os_error(exc: BaseException) -> OSError | None:
    """The OSError that `exc` is or wraps, if any."""
    return _wrapped(exc, OSError)


def _describe_write_error(path: Path, exc: BaseException, need: int = 0) -> str:
    """One line: the path being written (the file an OSError names, when it names one)
    and the error (its strerror for an OSError, torch's own message otherwise; with
    less than `need` bytes left on the filesystem, that it is full)."""
    if isinstance(exc, _WriteFailed):
        path, exc = exc.path, exc.error
    os_error = _first_os_error(exc)
    if os_error is not None:
        where = os_error.filename or path
        return f"writing {where}: [Errno {os_error.errno}] {os_error.strerror or os_error}"
    full = _disk_full(path, need)
    if full:  # torch's stream writer reports a short write without its errno
        return f"writing {path}: no space left on device ({full}; torch said {_reason(exc)})"
    return f"writing {path}: {_reason(exc)}"


#: Less free space than this (or than the last checkpoint took) after a failed write
#: reads as a full disk.
DISK_FULL_BYTES = 1 << 20


def _disk_full(path: Path, need: int = 0) -> str | None:
    """'N bytes free on the filesystem of P, ...' when the filesystem `path` is on has
    less than max(DISK_FULL_BYTES, `need`) bytes free (for root the reserved blocks
    count); None otherwise."""
    probe = next((p for p in (path, *path.parents) if p.exists()), None)
    if probe is None:
        return None
    try:
        st = os.statvfs(probe)
    except OSError:
        return None
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    if free >= max(DISK_FULL_BYTES, need):
        return None
    return f"{free} bytes free on the filesystem of {probe}, a checkpoint takes {need}"


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Within the block, any failure is a _WriteFailed naming `path` (torch.save's own
    errors name no file)."""
    try:
        yield
    except _WriteFailed:
        raise
    except (Exception, CheckpointException) as e:
        raise _WriteFailed(path, e) from e


def _agree(error: str | None) -> None:
    """Collective: raise _WriteFailed on every rank when any rank's `error` is set (its
    own, else the first failing rank's). The barrier between the phases of a save."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = error or next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)
    if first:
        raise _WriteFailed(Path(""), RuntimeError(first))


def _attempt(root: Path, path: Path, fn: Callable[[], object]) -> str | None:
    """Run `fn()`, which writes `path` under the checkpoint root `root`; the one-line
    description of its failure (None when it worked)."""
    try:
        with _writing(path):
            fn()
    except _WriteFailed as e:
        return _describe_write_error(path, e, _still_valid(root)[1])
    return None


def _still_valid(root: Path) -> tuple[Path | None, int]:
    """The newest checkpoint under `root` that still verifies (sizes, not checksums:
    this runs after a failed save, often on a full disk) and its size in bytes."""
    try:
        found = latest_valid_checkpoint(root, checksums=False)
        manifest = verify_checkpoint(found, checksums=False, only=()) if found else None
    except (CheckpointError, OSError):
        return None, 0
    size = sum(int(v[0]) for v in manifest["files"].values()) if manifest else 0
    return found, size


def _save_failed(root: Path, tmp: Path, step: int, exc: BaseException) -> CheckpointSaveError:
    """The one-line error of a failed save; the unfinished directory is removed (rank 0,
    best effort: it frees the space a full disk needs)."""
    valid, size = _still_valid(root)
    agreed = isinstance(exc, _WriteFailed) and not exc.path.name  # described by its rank
    reason = str(exc.error) if agreed else _describe_write_error(tmp, exc, size)
    if _rank() == 0:
        with contextlib.suppress(OSError):
            remove_entry(tmp)
    return CheckpointSaveError(
        f"saving the checkpoint of step {step} failed, {reason}; nothing of step {step} "
        f"was published, the newest checkpoint still valid: {valid or 'none'} (free the "
        "space or fix the error, then --resume continues from it)"
    )


def _prepare_tmp(root: Path, tmp: Path) -> None:
    """Rank 0: a fresh ``.tmp-step_N`` (a leftover one, or a link of that name, removed:
    the link itself, never what it points at)."""
    root.mkdir(parents=True, exist_ok=True)
    remove_entry(tmp)
    tmp.mkdir()
    (tmp / "dist").mkdir()
    (tmp / "rng").mkdir()


def _write_own_files(
    policy: CheckpointablePolicy, tmp: Path, *, mine: list[str], step: int, extra_state: Any
) -> None:
    """This rank's RNG file (rank 0: the extra state too), then every file of `mine`
    fsynced: durable before the manifest commits them."""
    rng_rel = f"rng/rank_{_rank():05d}.pt"
    with _writing(tmp / rng_rel):
        torch.save(_rng_state(), tmp / rng_rel)
    mine.append(rng_rel)
    if _rank() == 0:
        with _writing(tmp / "extra_state.pt"):
            torch.save(
                {"step": step, "policy_step": policy.step, "extra": extra_state},
                tmp / "extra_state.pt",
            )
        mine.append("extra_state.pt")
    for rel in mine:
        with _writing(tmp / rel):
            _fsync_file(tmp / rel)


def _commit(root: Path, tmp: Path, *, final: Path, name: str, keep_last: int | None) -> None:
    """Rank 0: publish the finished directory, point ``latest`` at it, prune."""
    _publish(tmp, final)
    with _writing(root / LATEST):
        _write_atomic(root / LATEST, name)
    _prune(root, keep_last, final)


def save_checkpoint(
    policy: CheckpointablePolicy,
    root: str | Path,
    extra_state: dict[str, Any],
    keep_last: int | None = 3,
    step: int | None = None,
) -> Path:
    """Collective: save under `root` as step `step` (default: `policy.step`, the count of
    optimizer steps; the RL loop passes its own step), atomically; keep the newest
    `keep_last` checkpoints (None: all). `extra_state` must be torch.load-able with
    weights_only=True (tensors, numbers, strings, lists, dicts). Returns the step dir.

    A failure to write (ENOSPC, EIO, EACCES, ...) on any rank is a CheckpointSaveError
    on every rank, one line naming the path and the newest checkpoint still valid; the
    unfinished directory is removed and the earlier checkpoints are untouched."""
    root = Path(root)
    step = policy.step if step is None else int(step)
    name = step_dir_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    try:
        _save(
            policy,
            root,
            tmp=tmp,
            final=final,
            step=step,
            extra_state=extra_state,
            keep_last=keep_last,
        )
    except (Exception, CheckpointException) as e:
        if isinstance(e, CheckpointError):
            raise
        log.debug("checkpoint save of step %d failed", step, exc_info=True)
        raise _save_failed(root, tmp, step, e) from e
    return final


def _save(
    policy: CheckpointablePolicy,
    root: Path,
    *,
    tmp: Path,
    final: Path,
    step: int,
    extra_state: dict[str, Any],
    keep_last: int | None,
) -> None:
    """The phases of `save_checkpoint`, each ending in an agreement of all ranks (a
    failure on one rank raises on every rank; none waits for one that has stopped)."""
    from megatron.core import dist_checkpointing

    rank = _rank()
    _agree(_attempt(root, tmp, partial(_prepare_tmp, root, tmp)) if rank == 0 else None)
    state = _sharded_state(policy, is_loading=False)
    strategy = save_strategy()
    reshard_fields = _reshard_fields(policy)
    with _writing(tmp / "dist"), cpu_compat.suspended():  # collective: fails on all ranks
        dist_checkpointing.save(state, str(tmp / "dist"), sharded_strategy=strategy)
    mine = [f"dist/{f}" for f in strategy.written]
    own = partial(_write_own_files, policy, tmp, mine=mine, step=step, extra_state=extra_state)
    _agree(_attempt(root, tmp, own))
    # every rank checksums its own files; rank 0 adds the rest and writes the manifest
    layout = {**_layout(), **reshard_fields}
    error = _attempt(root, tmp, partial(write_manifest, tmp, step=step, mine=mine, layout=layout))
    _agree(error)
    error = (
        _attempt(
            root,
            root,
            partial(_commit, root, tmp, final=final, name=final.name, keep_last=keep_last),
        )
        if rank == 0
        else None
    )
    _barrier()  # the other ranks wait here while rank 0 publishes (as they always have)
    _agree(error)


def _verify_shared_reads(
    step_dir: Path, files: dict[str, Any], own: list[str], checksums: bool
) -> LoadVerification:
    """Collective: each rank verifies the shared files and `own` (its RNG file) now;
    its torch_dist shard files are verified later, as their reads are planned
    (`verified_reads`, same record). Any rank's problem raises on all ranks."""
    record = LoadVerification()
    globals()["last_load_verification"] = record
    reads = [r for r in SHARED_READS if r in files or r == "extra_state.pt"] + own
    error = None
    try:
        record.check(step_dir, files, reads, checksums)
    except CheckpointError as e:
        error = str(e)
    _fail_together(error)
    return record


def _restore_state(policy: CheckpointablePolicy, loaded: dict[str, Any]) -> None:
    """Put loaded model, optimizer, scheduler and step state into the policy."""
    with torch.no_grad():  # fp32 main params are views of the (grad-requiring) model params
        policy.unwrapped().load_state_dict(loaded["model"])
        with keep_adam_step_on_reshardable_load(policy.optimizer):
            policy.optimizer.load_state_dict(loaded["optimizer"])
    restore_adam_steps(policy.optimizer, loaded["optimizer"])
    policy.scheduler.load_state_dict(loaded["scheduler"])
    policy.step = int(loaded["step"])


def _log_resharded(step_dir: Path, manifest: dict[str, Any], layout: dict[str, int]) -> None:
    log.warning(
        "checkpoint %s was saved at world_size=%s TP=%s PP=%s%s and is resumed at "
        "world_size=%s TP=%s PP=%s%s: model and optimizer state resharded; the per-rank "
        "RNG states are not restored (this run's seeded generators are kept)",
        step_dir,
        manifest.get("world_size"),
        manifest.get("tp"),
        manifest.get("pp"),
        f" EP={manifest['ep']}" if manifest.get("ep", 1) != 1 else "",
        layout["world_size"],
        layout["tp"],
        layout["pp"],
        f" EP={layout['ep']}" if layout["ep"] != 1 else "",
    )


def _load_error(step_dir: Path, exc: BaseException, record: LoadVerification) -> CheckpointError:
    """The CheckpointError for a failed megatron load: this rank's shard verification
    failure, else a refusal named inside it (a file that is not data), else one line of
    what megatron or torch raised."""
    if record.error:  # this rank's shard verification failed
        return CheckpointError(record.error)
    named = _checkpoint_error_in(exc)
    if named is not None:
        return CheckpointError(str(named))
    return CheckpointError(f"checkpoint {step_dir} could not be loaded: {_reason(exc)}")


def _load_own_files(step_dir: Path, rng_rel: str | None) -> tuple[dict[str, Any], Any]:
    """Collective: the extra state and (`rng_rel`, same layout only) this rank's RNG
    states, loaded as data only; a problem on any rank raises on all."""
    extra: dict[str, Any] = {}
    rng = None
    error = None
    try:
        extra = load_data_file(step_dir, "extra_state.pt")
        rng = load_data_file(step_dir, rng_rel) if rng_rel else None
        if not isinstance(extra, dict) or not {"step", "extra"} <= set(extra):
            raise CheckpointError(
                f"checkpoint {step_dir}: file extra_state.pt does not hold archer's extra state"
            )
    except CheckpointError as e:
        error = str(e)
    _fail_together(error)
    return extra, rng


def load_checkpoint(
    policy: CheckpointablePolicy, ckpt: str | Path, checksums: bool = True
) -> dict[str, Any]:
    """Collective: restore model, optimizer, scheduler, step and RNG from a step
    directory, or from the latest checkpoint when `ckpt` is a root. Returns the
    caller's extra state. Raises CheckpointError for a missing/partial/corrupt one.

    The checkpoint may have been saved at another TP/PP/DP layout (see the module
    docstring); the per-rank RNG states are then left as this run seeded them, and
    rank 0 logs that they were."""
    from megatron.core import dist_checkpointing

    step_dir, manifest = resolve_checkpoint(ckpt, checksums, only=())  # the manifest only
    sharding = _check_loadable(policy, step_dir, manifest)
    layout = _layout()
    # a manifest written before EP was recorded was saved at EP 1
    same_layout = all(manifest.get(k, 1 if k == "ep" else None) == v for k, v in layout.items())
    rng_rel = f"rng/rank_{_rank():05d}.pt"
    files = manifest["files"]
    # Each rank verifies what it reads: the shared files and its RNG file now, its
    # torch_dist shard files as their reads are planned; any rank's problem stops all.
    record = _verify_shared_reads(step_dir, files, [rng_rel] if same_layout else [], checksums)
    state = _sharded_state(policy, is_loading=True, sharding=sharding)
    sharded_strategy, common_strategy = data_only_load_strategies(step_dir)
    try:
        check_dist_format(step_dir)
        with cpu_compat.suspended(), verified_reads(step_dir, files, checksums, record):
            loaded = dist_checkpointing.load(
                state,
                str(step_dir / "dist"),
                sharded_strategy=sharded_strategy,
                common_strategy=common_strategy,
            )
    except (Exception, CheckpointException) as e:  # manifest-consistent but unloadable
        # torch.distributed.checkpoint raises its per-rank read failures (gathered from
        # all ranks; e.g. for a model of another shape) as CheckpointException, which
        # derives from BaseException and would escape `except Exception`.
        raise _load_error(step_dir, e, record) from e
    extra, rng = _load_own_files(step_dir, rng_rel if same_layout else None)
    _restore_state(policy, loaded)
    if int(extra["step"]) != int(manifest["step"]) or policy.step != int(
        extra.get("policy_step", extra["step"])
    ):
        raise CheckpointError(
            f"checkpoint {step_dir}: step mismatch between manifest, state and extra state"
        )
    if rng is not None:
        try:
            _set_rng_state(rng)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"checkpoint {step_dir}: file {rng_rel} does not hold RNG states ({_reason(e)})"
            ) from None
    elif _rank() == 0:
        _log_resharded(step_dir, manifest, layout)
    _barrier()
    return extra["extra"]
