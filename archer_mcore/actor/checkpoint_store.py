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

Nothing read from a checkpoint reaches outside its root or runs code: ``latest`` may
only name a step directory of its root (``step_<digits>``, never a path), a step
directory reached from a root must resolve inside it (a link out of the root is
skipped), a manifest's files must lie inside their step directory and be no links, and
the files are loaded as data only (`load_data_file`: ``torch.load(weights_only=True)``;
`load_json_file`). Only a step directory the user names explicitly (``archer eval
--checkpoint DIR``) is taken wherever it lies. Files are written and deleted without
following links (`archer_mcore.utils.safe_files`).

Integrity scales with the ranks: on save each rank checksums only the files it wrote
in a thread pool (``zlib.crc32`` and file reads release the GIL; large files are
hashed in blocks whose CRCs are combined), the per-rank results are gathered to rank
0, which adds the files only it wrote and writes the manifest. On load each rank
verifies only what it reads (`LoadVerification`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import stat
import time
import zlib
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from archer_mcore.utils.safe_files import (
    fsync_dir,
    remove_entry,
    resolves_inside,
    write_atomic,
)

MANIFEST = "MANIFEST.json"
LATEST = "latest"
FORMAT_VERSION = 1
#: What ``latest`` may hold: the name of a step directory of its own root.
STEP_NAME = re.compile(r"step_[0-9]{8,}")
_POINTER_MAX_BYTES = 4096


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
    fsync_dir(path)


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
    *,
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
        st = _plain_file(ckpt, rel)
        size = files[rel][0]
        if st is None:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: file {rel} is missing")
        if st.st_size != size:
            raise CheckpointError(
                f"checkpoint {ckpt} is corrupt: file {rel} has {st.st_size} bytes, the manifest says {size}"
            )
    if not checksums or not rels:
        return
    got = _crc32_many([ckpt / rel for rel in rels], threads, block)
    for rel, (_, crc) in zip(rels, got):
        if crc != files[rel][1]:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: file {rel} fails its CRC32 check")


def _plain_file(ckpt: Path, rel: str) -> os.stat_result | None:
    """lstat of the manifest entry `rel` of `ckpt`, None when it is missing; a
    CheckpointError when `rel` leads out of the step directory (an absolute path,
    ``..``, a link on the way) or is anything but a regular file."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise CheckpointError(
            f"checkpoint {ckpt}: its {MANIFEST} lists {rel!r}, a path outside the step "
            "directory; refusing to read it (the manifest was tampered with)"
        )
    path = ckpt / rel
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} is a symbolic link (to {os.readlink(path)}); "
            "checkpoint files are never read through links"
        )
    if not stat.S_ISREG(st.st_mode):
        return None
    if not resolves_inside(path, ckpt):  # a linked directory on the way
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} resolves to {os.path.realpath(path)}, outside "
            "the step directory; refusing to read it"
        )
    return st


def _write_atomic(path: Path, text: str) -> None:
    """`path` replaced by `text`, durably, never written through a link (``NAME.tmp``
    planted as a link is refused; a link at `path` is replaced, not followed)."""
    write_atomic(path, text)


# ------------------------------------------------------------------ data-only loading
def not_data_error(ckpt: Path, rel: str, exc: BaseException) -> CheckpointError:
    """The error for a file refused because loading it would run code."""
    reason = " ".join(str(exc).split())[:300]
    return CheckpointError(
        f"checkpoint {ckpt}: file {rel} is not plain data and was refused unread "
        f"(loading it would run code it carries: {reason}); the checkpoint was tampered "
        "with or is not one archer wrote: restore it from a trusted copy or resume from "
        "another checkpoint"
    )


def load_data_file(ckpt: Path, rel: str) -> Any:
    """``torch.load(ckpt/rel, weights_only=True)``: tensors, numbers, strings and
    containers only. A pickled object that would run code is a CheckpointError naming
    the file (nothing of it runs); so is a file that cannot be read as torch data."""
    path = ckpt / rel
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise not_data_error(ckpt, rel, exc) from None
    except (OSError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} is unreadable ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:300]})"
        ) from None


def load_json_file(ckpt: Path, rel: str) -> dict[str, Any]:
    """A JSON object from ckpt/rel; CheckpointError naming the file otherwise."""
    try:
        value = json.loads((ckpt / rel).read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError, JSONDecodeError
        raise CheckpointError(
            f"checkpoint {ckpt}: file {rel} is unreadable: not the JSON archer writes "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"checkpoint {ckpt}: file {rel} is unreadable: not a JSON object")
    return value


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
    if _plain_file(ckpt, MANIFEST) is None:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {MANIFEST} is missing")
    manifest = load_json_file(ckpt, MANIFEST)
    try:
        files = manifest["files"]
        int(manifest["step"])
        if not isinstance(files, dict):
            raise TypeError("'files' is not a mapping")
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
    ``.tmp-*`` saves are ignored. Does not verify: `load_checkpoint` does. A ``latest``
    that names anything but a step directory inside `root` is a CheckpointError."""
    root = Path(root)
    if not root.is_dir():
        return None
    named = _latest_pointer(root)
    if named is not None:
        return named
    steps = [p for p in _step_dirs(root) if _inside_root(root, p) is None]
    steps = [p for p in steps if (p / MANIFEST).is_file()]
    return steps[-1] if steps else None


def _inside_root(root: Path, step_dir: Path) -> str | None:
    """Why `step_dir` (an entry of `root`) is not a checkpoint of `root`: it resolves
    outside it (a link elsewhere). None when it lies inside."""
    if resolves_inside(step_dir, root):
        return None
    return (
        f"checkpoint {step_dir} resolves to {os.path.realpath(step_dir)}, outside the "
        f"checkpoint root {root}; a checkpoint of a root must lie inside it (name a "
        "checkpoint elsewhere explicitly, e.g. archer eval --checkpoint DIR)"
    )


def _step_dirs(root: Path) -> list[Path]:
    """The ``step_*`` entries of `root` that are directories (or links to one), in
    step order."""
    return sorted(p for p in root.glob("step_*") if p.is_dir())


def _latest_pointer(root: Path) -> Path | None:
    """The step directory ``root/latest`` names; None without one (or an empty one).
    CheckpointError naming the pointer when it is a link, not UTF-8 text, not the name
    of a step directory (a path, ``..``, ``/etc``), or names one outside `root`."""
    pointer = root / LATEST
    try:
        st = os.lstat(pointer)
    except FileNotFoundError:
        return None

    def bad(why: str) -> CheckpointError:
        return CheckpointError(
            f"{pointer} {why}; it may only hold the name of a step directory inside "
            f"{root} (like {step_dir_name(42)}): delete it, --resume then takes the newest "
            "valid step directory"
        )

    if stat.S_ISLNK(st.st_mode):
        raise bad(f"is a symbolic link (to {os.readlink(pointer)})")
    if not stat.S_ISREG(st.st_mode):
        raise bad("is not a regular file")
    if st.st_size > _POINTER_MAX_BYTES:
        raise bad(f"has {st.st_size} bytes")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise bad("is not text (not a pointer archer wrote)") from None
    if not name:
        return None
    if not STEP_NAME.fullmatch(name):
        raise bad(f"names {name[:200]!r}, which is not a step directory")
    step_dir = root / name
    outside = _inside_root(root, step_dir)
    if outside:
        raise CheckpointError(f"{pointer} names {name}: {outside}")
    return step_dir


def latest_valid_checkpoint(
    root: str | Path,
    checksums: bool = True,
    report: Callable[[Path, str], None] | None = None,
) -> Path | None:
    """The newest checkpoint under `root` that passes `verify_checkpoint`: the one
    ``latest`` names first, then the step directories from the highest step down.
    Each damaged one is skipped and passed to `report(step_dir, reason)` (when given);
    so are a ``latest`` that names anything but a step directory of `root` (reported
    as ``root/latest``) and a step directory that resolves outside `root`. None when
    the root holds no checkpoint at all; CheckpointError (listing every reason) when it
    holds some and none is valid."""
    root = Path(root)
    if not root.is_dir():
        return None
    skipped: list[str] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append(reason)
        if report is not None:
            report(path, reason)

    try:
        named = _latest_pointer(root)
    except CheckpointError as exc:
        skip(root / LATEST, str(exc))
        named = None
    candidates: list[Path] = [] if named is None else [named]
    for p in reversed(_step_dirs(root)):
        if p not in candidates:
            candidates.append(p)
    for p in candidates:
        try:
            outside = _inside_root(root, p)
            if outside:
                raise CheckpointError(outside)
            verify_checkpoint(p, checksums=checksums)
        except CheckpointError as exc:
            skip(p, str(exc))
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
    start on its own. A step directory named here is taken wherever it lies (the user
    named it); from a root only one inside it."""
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
    *,
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
    if os.path.lexists(final):
        old = final.with_name(f".old-{final.name}")
        remove_entry(old)
        os.replace(final, old)  # a link at `final` is moved aside as a link
        os.replace(tmp, final)
        remove_entry(old)  # a link: the link itself, never its target
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(root: Path, keep_last: int | None, current: Path) -> None:
    """Delete unfinished saves, and finished checkpoints older than `current` (the one
    just written) beyond the newest `keep_last` (counting `current`). `current` itself
    is never deleted, nor are higher-numbered directories (left by a run that was
    resumed from an older checkpoint; the run replaces them as it reaches their steps)."""
    for p in root.glob(".tmp-step_*"):
        _remove_quietly(p)
    if keep_last is None or keep_last <= 0:
        return
    older = sorted(
        p for p in root.glob("step_*") if (p.is_dir() or p.is_symlink()) and p.name < current.name
    )
    for p in older[: max(0, len(older) - (keep_last - 1))]:
        _remove_quietly(p)


def _remove_quietly(path: Path) -> None:
    """Delete an old save (a link: the link, never its target); a failure only leaves
    it behind."""
    with contextlib.suppress(OSError):
        remove_entry(path)
