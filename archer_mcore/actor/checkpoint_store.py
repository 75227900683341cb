"""Checkpoint files on disk: the directory layout, names, checksums, the manifest,
publishing and pruning, and the resolution of which checkpoint to load. Knows nothing
of megatron or of the policy (`actor.checkpoint` saves and loads the state itself).

Layout under a checkpoint root:

    root/step_00000042/dist/            megatron dist_checkpointing (torch_dist): model,
                                        optimizer (fully_reshardable), LR scheduler, step
    root/step_00000042/rng/rank_*.pt    per-rank RNG states (CPU, CUDA, megatron tracker,
                                        python)
    root/step_00000042/extra_state.pt   the caller's opaque dict (e.g. data position)
    root/step_00000042/MANIFEST.json    written last: step, layout, every file's size and
                                        CRC32
    root/latest                         name of the newest complete checkpoint

A save writes everything into ``root/.tmp-step_N``, fsyncs it, writes the manifest
(`write_manifest`) and only then renames the directory into place (`_publish`) and
updates ``latest``, so a crash at any point leaves either the previous checkpoints or a
``.tmp-*`` directory that is never loaded. `verify_checkpoint` checks a step directory
against its manifest (presence, sizes, checksums) and raises `CheckpointError` naming
the problem. Resolution: `resolve_checkpoint` (a step directory, or a root's latest;
`archer eval` and `load_checkpoint` use it) never falls back on its own;
`latest_valid_checkpoint` (`--resume`) picks the newest checkpoint that verifies and
reports each damaged one it skips. Pruning (`_prune`) keeps the checkpoint just
written and deletes only older ones beyond `keep_last`.

Integrity scales with the ranks: on save each rank checksums only the files it wrote
in a thread pool (``zlib.crc32`` and file reads release the GIL; large files are
hashed in blocks whose CRCs are combined), the per-rank results are gathered to rank
0, which adds the files only it wrote and writes the manifest. On load each rank
verifies only what it reads (`LoadVerification`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

MANIFEST = "MANIFEST.json"
LATEST = "latest"
FORMAT_VERSION = 1


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


# ------------------------------------------------------------------ checksums
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


# ------------------------------------------------------------------ verification, resolution
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
    named = _latest_pointer(root)
    if named is not None:
        return named
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST).is_file())
    return steps[-1] if steps else None


def _latest_pointer(root: Path) -> Path | None:
    """The step directory ``root/latest`` names; None without one (or an empty one)."""
    pointer = root / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else ""
    return root / name if name else None


def latest_valid_checkpoint(
    root: str | Path,
    checksums: bool = True,
    report: Callable[[Path, str], None] | None = None,
) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`: the one
    ``latest`` names first, then the step directories from the highest step down.
    Each damaged one is skipped and passed to `report(step_dir, reason)` (when given).
    None when the root holds no checkpoint at all; CheckpointError (listing every
    reason) when it holds some and none is valid."""
    root = Path(root)
    if not root.is_dir():
        return None
    named = _latest_pointer(root)
    candidates: list[Path] = [] if named is None else [named]
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


# ------------------------------------------------------------------ writing
def _gather_to_rank0(obj: Any) -> list[Any] | None:
    """Collective: every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


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
