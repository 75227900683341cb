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
ones beyond `keep_last`.

Integrity scales with the ranks: on save each rank checksums only the files it wrote
(its torch_dist shard files, as the storage writer reports them, and its RNG file) in a
thread pool (``zlib.crc32`` and file reads release the GIL), the per-rank results are
gathered to rank 0, which adds the files only it wrote (metadata, extra state) and
writes the manifest. On load each rank verifies only what it reads: the shared small
files, its own RNG file, and the shard files in its torch_dist read plan (checked as
the storage reader is handed the plan); a problem on any rank fails the load on all. The frozen
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

import contextlib
import json
import logging
import os
import random
import shutil
import time
import zlib
from collections.abc import Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from archer_mcore.parallel import cpu_compat

if TYPE_CHECKING:
    from archer_mcore.actor.policy import MegatronPolicy

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


#: Files are checksummed in blocks of this many bytes, one block per task, so that one
#: large shard file is hashed by several threads; the blocks' CRCs are then combined.
CRC_BLOCK_BYTES = 64 << 20
_CRC_POLY = 0xEDB88320  # CRC-32 (zlib), reflected


def _gf2_apply(op: list[int], vec: int) -> int:
    """A 32x32 GF(2) matrix, as its 32 columns, applied to a 32-bit vector."""
    out, i = 0, 0
    while vec:
        if vec & 1:
            out ^= op[i]
        vec >>= 1
        i += 1
    return out


def _gf2_compose(a: list[int], b: list[int]) -> list[int]:
    """The operator a(b(x)), as columns."""
    return [_gf2_apply(a, col) for col in b]


def crc32_shift(nbytes: int) -> list[int]:
    """The GF(2)-linear map that takes the CRC-32 state past `nbytes` zero bytes.

    One zero bit maps state x to (x >> 1) ^ (POLY if x & 1): column 0 is POLY, column
    n the bit n - 1. Eight of them make a byte; powers by repeated squaring."""
    bit = [_CRC_POLY] + [1 << (n - 1) for n in range(1, 32)]
    step = _gf2_compose(bit, bit)
    step = _gf2_compose(step, step)
    step = _gf2_compose(step, step)  # one zero byte
    out = [1 << n for n in range(32)]  # identity
    while nbytes:
        if nbytes & 1:
            out = _gf2_compose(step, out)
        step = _gf2_compose(step, step)
        nbytes >>= 1
    return out


def crc32_combine(crc_a: int, crc_b: int, len_b: int, shift: list[int] | None = None) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B): zlib's pre- and
    post-conditioning cancel, leaving crc(A) advanced over len(B) zero bytes, xor
    crc(B). `shift`: a precomputed ``crc32_shift(len_b)``."""
    return _gf2_apply(shift or crc32_shift(len_b), crc_a) ^ crc_b


def _crc32_range(path: Path, start: int, length: int, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0 and (block := f.read(min(chunk, length))):
            crc = zlib.crc32(block, crc)
            length -= len(block)
    return crc


def _threads(n_tasks: int, threads: int | None) -> int:
    return max(1, min(n_tasks, threads or min(8, os.cpu_count() or 1)))


def _crc32_many(
    paths: list[Path], threads: int | None, block: int | None = None
) -> list[tuple[int, int]]:
    """(size, CRC32) of each path: every `block`-byte block of every file is one task of
    a thread pool (reads and ``zlib.crc32`` release the GIL), then each file's block
    CRCs are combined in order."""
    block = block or CRC_BLOCK_BYTES
    sizes = [p.stat().st_size for p in paths]
    tasks = [(i, off) for i, n in enumerate(sizes) for off in range(0, max(n, 1), block)]
    with ThreadPoolExecutor(_threads(len(tasks), threads)) as pool:
        crcs = list(pool.map(lambda t: _crc32_range(paths[t[0]], t[1], block), tasks))
    full = crc32_shift(block) if any(n > block for n in sizes) else None
    out: list[tuple[int, int]] = []
    k = 0
    for n in sizes:
        crc = crcs[k]
        for off in range(block, n, block):
            k += 1
            length = min(block, n - off)
            crc = crc32_combine(crc, crcs[k], length, full if length == block else None)
        k += 1
        out.append((n, crc))
    return out


def checksum_files(
    root: Path, rels: Collection[str], threads: int | None = None, block: int | None = None
) -> dict[str, list[int]]:
    """{relative path: [size in bytes, CRC32]} of files under `root`, hashed in blocks
    (`block` bytes, default CRC_BLOCK_BYTES) by a pool of `threads` threads (default:
    min(8, CPUs))."""
    rels = sorted(rels)
    return {
        rel: [n, crc]
        for rel, (n, crc) in zip(rels, _crc32_many([root / r for r in rels], threads, block))
    }


def verify_files(
    ckpt: Path,
    files: Mapping[str, Any],
    rels: Collection[str],
    checksums: bool = True,
    threads: int | None = None,
    block: int | None = None,
) -> None:
    """Check the files `rels` of checkpoint `ckpt` against the manifest entries `files`
    ({rel: [size, crc]}): listed, present, of the recorded size, and (with `checksums`)
    of the recorded CRC32, hashed in blocks by a thread pool (`checksum_files`). Raises
    CheckpointError naming the first failing file in sorted order."""
    rels = sorted(rels)
    for rel in rels:
        if rel not in files:
            raise CheckpointError(f"checkpoint {ckpt}: file {rel} is not in its {MANIFEST}")
        p, size = ckpt / rel, files[rel][0]
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: file {rel} is missing")
        if p.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: file {rel} has {p.stat().st_size} bytes, the manifest says {size}"
            )
    if not checksums or not rels:
        return
    got = _crc32_many([ckpt / rel for rel in rels], threads, block)
    for rel, (_, crc) in zip(rels, got):
        if crc != files[rel][1]:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: file {rel} fails its CRC32 check")


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
def verify_checkpoint(
    ckpt: str | Path, checksums: bool = True, only: Collection[str] | None = None
) -> dict[str, Any]:
    """Check a step directory against its manifest; returns the manifest.

    `only`: the manifest's files to check (None: all, hashed in a thread pool; empty:
    the manifest itself only). Raises CheckpointError naming the directory and the
    first problem found."""
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
    verify_files(ckpt, files, files if only is None else only, checksums)
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


def resolve_checkpoint(
    ckpt: str | Path, checksums: bool = True, only: Collection[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """A step directory, or a root (then its latest checkpoint), verified: returns
    (step_dir, manifest). `only`: the files to verify (None: all; `load_checkpoint`
    passes none and has each rank verify what it reads). Raises CheckpointError if there
    is none or it is damaged; it never falls back to an older checkpoint or to a fresh
    start on its own."""
    ckpt = Path(ckpt)
    if (ckpt / MANIFEST).is_file() or ckpt.name.startswith(("step_", ".tmp-")):
        step_dir = ckpt
    else:
        found = find_latest_checkpoint(ckpt)
        if found is None:
            raise CheckpointError(f"no checkpoint under {ckpt}")
        step_dir = found
    return step_dir, verify_checkpoint(step_dir, checksums=checksums, only=only)


# ------------------------------------------------------------------ per-rank integrity
#: Files every rank reads on load (when the manifest lists them): the caller's extra
#: state, and megatron's common state, its format metadata and the torch_dist metadata.
SHARED_READS = ("extra_state.pt", "dist/common.pt", "dist/metadata.json", "dist/.metadata")


def _gather_to_rank0(obj: Any) -> list[Any] | None:
    """Collective: every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


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


def write_manifest(
    tmp: Path,
    step: int,
    mine: Collection[str],
    layout: Mapping[str, int],
    threads: int | None = None,
) -> dict[str, Any] | None:
    """Collective: checksum the files this rank wrote (`mine`, relative to `tmp`) in a
    thread pool, gather the results to rank 0, which checksums what no rank claimed (the
    files only it writes: metadata, extra state), fsyncs them and the directories, and
    writes the manifest. Returns the manifest on rank 0, None elsewhere."""
    parts = _gather_to_rank0(checksum_files(tmp, mine, threads))
    if parts is None:
        return None
    files: dict[str, list[int]] = {}
    for part in parts:
        files.update(part)
    on_disk = set()
    for dirpath, _, names in os.walk(tmp):
        on_disk.update(str((Path(dirpath) / n).relative_to(tmp)) for n in names)
    if set(files) - on_disk:
        raise CheckpointError(
            f"{tmp}: ranks reported files that are not there: {sorted(set(files) - on_disk)}"
        )
    rest = on_disk - set(files)
    for rel in rest:
        _fsync_file(tmp / rel)
    for dirpath, _, _ in os.walk(tmp):
        _fsync_dir(Path(dirpath))
    files.update(checksum_files(tmp, rest, threads))
    manifest = {"format_version": FORMAT_VERSION, "step": step, **layout, "files": files}
    _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


class LoadVerification:
    """What one rank verified during its last `load_checkpoint` (for tests and the
    benchmark): the files, the seconds spent, and the error it found, if any."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.seconds = 0.0
        self.error: str | None = None

    def check(
        self, ckpt: Path, files: Mapping[str, Any], rels: Collection[str], checksums: bool
    ) -> None:
        t0 = time.perf_counter()
        try:
            verify_files(ckpt, files, rels, checksums)
        except CheckpointError as e:
            self.error = str(e)
            raise
        finally:
            self.files.extend(sorted(rels))
            self.seconds += time.perf_counter() - t0


last_load_verification = LoadVerification()


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
    strategy = _save_strategy()
    reshard_fields = _reshard_fields(policy)
    with cpu_compat.suspended():
        dist_checkpointing.save(state, str(tmp / "dist"), sharded_strategy=strategy)
    mine = [f"dist/{f}" for f in strategy.written] + [f"rng/rank_{rank:05d}.pt"]
    torch.save(_rng_state(), tmp / mine[-1])
    if rank == 0:
        torch.save(
            {"step": step, "policy_step": policy.step, "extra": extra_state},
            tmp / "extra_state.pt",
        )
        mine.append("extra_state.pt")
    for rel in mine:  # every rank: its own writes are durable before the commit
        _fsync_file(tmp / rel)
    # every rank checksums its own files; rank 0 adds the rest and writes the manifest
    write_manifest(tmp, step, mine, {**_layout(), **reshard_fields})
    if rank == 0:
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

    step_dir, manifest = resolve_checkpoint(ckpt, checksums, only=())  # the manifest only
    sharding = _check_loadable(policy, step_dir, manifest)
    layout = _layout()
    same_layout = all(manifest.get(k) == v for k, v in layout.items())
    rank = _rank()
    rng_rel = f"rng/rank_{rank:05d}.pt"
    rng_file = step_dir / rng_rel
    files = manifest["files"]
    # Each rank verifies what it reads: the shared files and its RNG file now, its
    # torch_dist shard files as their reads are planned; any rank's problem stops all.
    record = LoadVerification()
    globals()["last_load_verification"] = record
    reads = [r for r in SHARED_READS if r in files or r == "extra_state.pt"] + (
        [rng_rel] if same_layout else []
    )
    error = None
    try:
        record.check(step_dir, files, reads, checksums)
    except CheckpointError as e:
        error = str(e)
    _fail_together(error)
    state = _sharded_state(policy, is_loading=True, sharding=sharding)
    # torch.distributed.checkpoint raises its per-rank read failures (gathered from all
    # ranks) as CheckpointException, a BaseException.
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with cpu_compat.suspended(), verified_reads(step_dir, files, checksums, record):
            loaded = dist_checkpointing.load(state, str(step_dir / "dist"))
        extra = torch.load(step_dir / "extra_state.pt", weights_only=True)
        rng = torch.load(rng_file, weights_only=False) if same_layout else None
    except (Exception, CheckpointException) as e:  # manifest-consistent but unloadable
        # (torch's CheckpointException, e.g. for a model of another shape, derives from
        # BaseException and would escape `except Exception`)
        if record.error:  # this rank's shard verification failed
            raise CheckpointError(record.error) from e
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
