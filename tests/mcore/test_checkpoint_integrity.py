"""Checkpoint integrity that scales: each rank checksums only the files it wrote, the
results are combined into one manifest, each rank verifies only what it reads, and a
truncated, flipped or missing file still fails the load with CheckpointError (on every
rank, naming the file)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch.multiprocessing as mp
from conftest import free_port, save_tiny_hf

from archer_mcore.actor.checkpoint_store import (
    MANIFEST,
    CheckpointError,
    checksum_files,
    crc32_combine,
    crc32_shift,
    verify_checkpoint,
    verify_files,
)


def test_checksum_files_against_zlib_of_the_whole_file(tmp_path):
    """Thread-pool checksums equal zlib.crc32 of each file's full contents (files larger
    than the 4 MiB read chunk included), and verify_files names the first bad file."""
    sizes = {"a.bin": 0, "b/c.bin": 5, "b/d.bin": (1 << 22) + 12345, "e.bin": 3 << 20}
    for i, (rel, n) in enumerate(sizes.items()):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes((i * 7 + k * 13) % 251 for k in range(n)))
    got = checksum_files(tmp_path, list(sizes), threads=3)
    for rel in sizes:
        data = (tmp_path / rel).read_bytes()
        assert got[rel] == [len(data), zlib.crc32(data)], rel
    # 1 MiB blocks: d.bin is hashed as 5 blocks (the last one short), e.bin as 3
    assert checksum_files(tmp_path, list(sizes), threads=4, block=1 << 20) == got
    verify_files(tmp_path, got, sizes, threads=2, block=1 << 20)
    with open(tmp_path / "b/d.bin", "r+b") as f:
        f.seek(1 << 22)  # in the second read chunk
        f.write(b"\x00")
    with open(tmp_path / "e.bin", "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(CheckpointError, match="file b/d.bin fails its CRC32"):
        verify_files(tmp_path, got, sizes, threads=4, block=1 << 20)
    with pytest.raises(CheckpointError, match="e.bin fails"):
        verify_files(tmp_path, got, ["a.bin", "e.bin"])
    verify_files(tmp_path, got, ["a.bin", "b/c.bin"])  # only what is asked
    with pytest.raises(CheckpointError, match="not in its"):
        verify_files(tmp_path, got, ["zzz.bin"])


@pytest.mark.parametrize("len_a,len_b", [(0, 0), (1, 0), (0, 5), (3, 7), (1000, 1), (777, 65537)])
def test_crc32_combine_matches_zlib(len_a, len_b):
    import random

    rng = random.Random(len_a * 31 + len_b)
    a, b = rng.randbytes(len_a), rng.randbytes(len_b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len_b) == zlib.crc32(a + b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len_b, crc32_shift(len_b)) == zlib.crc32(
        a + b
    )


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_per_rank_checksums_and_verification(tmp_path):
    hf = save_tiny_hf("qwen3", tmp_path / "hf", seed=5)
    root = tmp_path / "ckpt"
    corruptions = [
        ("flip_shard1", "dist/__1_0.distcp", "flip"),
        ("missing_shard0", "dist/__0_0.distcp", "missing"),
        ("truncate_rng1", "rng/rank_00001.pt", "truncate"),
        ("flip_extra", "extra_state.pt", "flip"),
        ("flip_metadata", "dist/.metadata", "flip"),
    ]
    result = tmp_path / "result.json"
    import integrity_workers

    payload = {"hf_dir": str(hf), "root": str(root), "corruptions": corruptions}
    mp.start_processes(
        integrity_workers.entry,
        args=(2, free_port(), "integrity", payload, str(result)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    res = json.loads(result.read_text())
    step = root / "step_00000001"
    manifest = verify_checkpoint(step)  # every file, against its recorded CRC
    files = manifest["files"]
    for rel, (size, crc) in files.items():  # an independent check of the manifest
        data = (step / rel).read_bytes()
        assert [size, crc] == [len(data), zlib.crc32(data)], rel
    on_disk = {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(files) == on_disk

    # Save: every file checksummed exactly once, each rank only its own writes.
    h0, h1 = res["hashed_on_save"]
    assert sorted(h0 + h1) == sorted(files)
    assert h1 == ["dist/__1_0.distcp", "rng/rank_00001.pt"]
    assert "dist/__0_0.distcp" in h0 and "rng/rank_00000.pt" in h0 and "extra_state.pt" in h0
    assert not any(f.startswith("dist/__1_") or f.endswith("rank_00001.pt") for f in h0)

    # Load: each rank verified the shared files, its own RNG file and its read plan's
    # shards, never the other rank's RNG file.
    v0, v1 = (set(v) for v in res["verified_on_load"])
    shared = {"extra_state.pt", "dist/common.pt", "dist/metadata.json", "dist/.metadata"} & set(
        files
    )
    assert shared <= v0 and shared <= v1
    assert "rng/rank_00000.pt" in v0 and "rng/rank_00001.pt" not in v0
    assert "rng/rank_00001.pt" in v1 and "rng/rank_00000.pt" not in v1
    assert "dist/__0_0.distcp" in v0 and "dist/__1_0.distcp" in v1
    assert v0 | v1 == set(files)

    c = res["corruptions"]
    for name, _, _ in corruptions:
        for r, got in enumerate(c[name]):
            assert got["raised"] == "CheckpointError", (name, r, got)
    what = {"flip": "fails its CRC32 check", "missing": "is missing", "truncate": "bytes"}
    # the rank that reads the damaged file names it and the problem
    readers = {"flip_shard1": [1], "missing_shard0": [0], "truncate_rng1": [1]}
    for name, rel, how in corruptions:
        for r in readers.get(name, [0, 1]):
            msg = c[name][r]["message"]
            assert rel in msg and what[how] in msg, (name, r, msg)
    # a rank whose own reads are fine learns which rank found the problem
    assert c["truncate_rng1"][0]["message"].startswith("rank 1: ")
