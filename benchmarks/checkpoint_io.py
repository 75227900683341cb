#!/usr/bin/env python
"""Checkpoint integrity cost vs checkpoint size: the old serial scheme and the per-rank
parallel one, side by side in one run.

For each model shape (Qwen2-0.5B and R1-Distill-Qwen-1.5B, bf16 parameters only: the
fp32 master weights and Adam moments of a real checkpoint, 6x more bytes, would not fit
this 24 GiB machine at 1.5B) and each world size (gloo processes), every rank holds its
1/world slice (split along dim 0, as tensor parallelism would) of every parameter and
saves it with megatron-core's dist_checkpointing in the trainer's torch_dist format
(`archer_mcore.actor.checkpoint_mcore.save_strategy`). Then, timed between barriers:

* manifest, old: rank 0 walks the directory, CRC32s every file one after another and
  writes the manifest (what `save_checkpoint` did before);
* manifest, new: `write_manifest`: each rank CRC32s the files it wrote (64 MiB blocks
  in a thread pool), the results are gathered to rank 0, which CRC32s and fsyncs its
  metadata files and writes the manifest;
* verify, old: every rank stats and CRC32s every file serially (what `load_checkpoint`
  did through `resolve_checkpoint` before);
* verify, new: every rank loads its shards with `dist_checkpointing.load` inside
  `verified_reads` plus the shared-file check, as `load_checkpoint` does; the figure is
  the time spent verifying (the slowest rank), the load time is reported beside it.

Old and new alternate `--repeats` times; each figure is the best of its repeats.

Files were just written, so reads come from the page cache: the figures are CRC-bound
(the best case for the serial scheme; on a cluster file system the serial scheme also
pays one reader's bandwidth for the whole checkpoint).

Usage:  python benchmarks/checkpoint_io.py [--shapes 0.5b,1.5b] [--ranks 1,2]
            [--threads N] [--dir /tmp/ckpt_bench] [--out benchmarks/results/checkpoint_io.json]
        python benchmarks/checkpoint_io.py --shapes tiny   (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {  # Qwen2-0.5B
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "1.5b": {  # DeepSeek-R1-Distill-Qwen-1.5B (configs/hf), untied
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    },
    "tiny": {
        "model_type": "qwen2",
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}


def param_shapes(hf: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """megatron-named parameter shapes of the (unsharded) model."""
    from archer_mcore.model.hf_config import shape_from_hf_config

    m = shape_from_hf_config(hf)
    h, d, a, g, f = m.hidden_size, m.head_dim, m.num_heads, m.num_kv_heads, m.ffn_hidden_size
    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (m.vocab_size, h)}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "self_attention.linear_qkv.weight"] = ((a + 2 * g) * d, h)
        out[p + "self_attention.linear_qkv.bias"] = ((a + 2 * g) * d,)
        out[p + "self_attention.linear_proj.weight"] = (h, a * d)
        out[p + "pre_mlp_layernorm.weight"] = (h,)
        out[p + "mlp.linear_fc1.weight"] = (2 * f, h)
        out[p + "mlp.linear_fc2.weight"] = (h, f)
    out["decoder.final_layernorm.weight"] = (h,)
    if not m.tie_embeddings:
        out["output_layer.weight"] = (m.vocab_size, h)
    return out


def _serial_manifest(root: Path) -> dict[str, list[int]]:
    from archer_mcore.actor.checkpoint_store import _crc32

    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            files[str(p.relative_to(root))] = [p.stat().st_size, _crc32(p)]
    return files


def _serial_verify(root: Path, files: dict[str, list[int]]) -> None:
    from archer_mcore.actor.checkpoint_store import _crc32

    for rel, (size, crc) in files.items():
        p = root / rel
        assert p.is_file() and p.stat().st_size == size and _crc32(p) == crc, rel


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def _max(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def worker(rank: int, world: int, port: int, args: dict[str, Any], out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    import archer_mcore.actor.checkpoint as ckpt
    import archer_mcore.actor.checkpoint_mcore as mcore_ckpt
    import archer_mcore.actor.checkpoint_store as store
    from archer_mcore.parallel import cpu_compat

    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(args["dir"]) / f"{args['shape']}_w{world}"
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        (root / "dist").mkdir(parents=True)
    dist.barrier()

    def sharded(fill: bool) -> dict[str, Any]:
        g = torch.Generator().manual_seed(rank)
        sd = {}
        for name, shape in param_shapes(SHAPES[args["shape"]]).items():
            local = (shape[0] // world, *shape[1:])
            t = torch.empty(local, dtype=torch.bfloat16)
            if fill:
                t.copy_(torch.randn(local, generator=g))
            sd[name] = ShardedTensor.from_rank_offsets(name, t, (0, rank, world), replica_id=0)
        return sd

    box = [sharded(True)]
    nbytes = sum(v.data.numel() * 2 for v in box[0].values())
    strategy = mcore_ckpt.save_strategy()
    with cpu_compat.suspended():
        t_write = _timed(lambda: dist_checkpointing.save(box[0], str(root / "dist"), strategy))
    box.clear()  # free the tensors before the reads
    mine = [f"dist/{f}" for f in strategy.written]
    layout = {"world_size": world, "tp": world, "pp": 1}
    threads = args["threads"]
    res: dict[str, Any] = {}
    man_old: dict[str, Any] = {}

    def old_manifest() -> None:  # as save_checkpoint did: walk, CRC, write (rank 0)
        if rank == 0:
            man_old.update(_serial_manifest(root))
            body = {"format_version": 1, "step": 1, **layout, "files": man_old}
            store._write_atomic(root / store.MANIFEST, json.dumps(body, indent=1, sort_keys=True))

    holder: dict[str, Any] = {}

    def new_manifest() -> None:
        holder["m"] = store.write_manifest(root, 1, mine, layout, threads=threads)

    reps = args["repeats"]
    # old and new alternate, `reps` times each; the best of each is reported
    old_t, new_t = [], []

    def clear() -> None:  # the previous repeat's manifest is not part of the checkpoint
        if rank == 0:
            (root / store.MANIFEST).unlink(missing_ok=True)

    for _ in range(reps):
        clear()
        old_t.append(_timed(old_manifest))
        clear()
        new_t.append(_timed(new_manifest))
    res["manifest_old_s"], res["manifest_new_s"] = min(old_t), min(new_t)
    files = [holder.get("m")]
    dist.broadcast_object_list(files, src=0)
    files_map = files[0]["files"]
    if rank == 0:
        assert {k: v for k, v in files_map.items()} == man_old, "manifests differ"
    target = sharded(False)
    old_t, new_t, load_t, plain_t = [], [], [], []
    for _ in range(reps):
        old_t.append(_timed(lambda: _serial_verify(root, files_map)))
        record = store.LoadVerification()

        def new_verify_and_load(record: store.LoadVerification = record) -> None:
            reads = [r for r in ckpt.SHARED_READS if r in files_map]
            record.check(root, files_map, reads, True)
            with cpu_compat.suspended(), mcore_ckpt.verified_reads(root, files_map, True, record):
                dist_checkpointing.load(target, str(root / "dist"))

        load_t.append(_timed(new_verify_and_load))
        new_t.append(_max(record.seconds))
        plain_t.append(_timed(lambda: dist_checkpointing.load(target, str(root / "dist"))))
    res["verify_old_s"], res["verify_new_s"] = min(old_t), min(new_t)
    res["load_with_new_verify_s"], res["load_unverified_s"] = min(load_t), min(plain_t)
    res["verified_files_rank0"] = len(record.files)
    res.update(
        shape=args["shape"],
        world=world,
        threads=threads or min(8, os.cpu_count() or 1),
        bytes=_max(nbytes) * world,
        files=len(files_map),
        write_s=t_write,
    )
    if rank == 0:
        Path(out_path).write_text(json.dumps(res))
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="0.5b,1.5b")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--threads", type=int, default=0, help="CRC threads per rank (0: min(8, CPUs))")
    ap.add_argument("--repeats", type=int, default=3, help="best of N, old and new alternating")
    ap.add_argument("--dir", default="/tmp/archer_ckpt_bench")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    rows = []
    for shape in a.shapes.split(","):
        for world in (int(w) for w in a.ranks.split(",")):
            out = Path(a.dir) / f"result_{shape}_{world}.json"
            Path(a.dir).mkdir(parents=True, exist_ok=True)
            args = {
                "shape": shape,
                "dir": a.dir,
                "threads": a.threads or None,
                "repeats": a.repeats,
            }
            mp.start_processes(
                worker, args=(world, _port(), args, str(out)), nprocs=world, start_method="spawn"
            )
            r = json.loads(out.read_text())
            r["loadavg_1m"] = os.getloadavg()[0]
            rows.append(r)
            gb = r["bytes"] / 1e9
            print(
                f"{shape:>5} ranks {world}: {gb:5.2f} GB in {r['files']} files, write {r['write_s']:6.2f} s | "
                f"manifest old {r['manifest_old_s']:6.2f} s new {r['manifest_new_s']:6.2f} s "
                f"({r['manifest_old_s'] / r['manifest_new_s']:.2f}x) | verify old {r['verify_old_s']:6.2f} s "
                f"new {r['verify_new_s']:6.2f} s ({r['verify_old_s'] / max(r['verify_new_s'], 1e-9):.2f}x) | "
                f"load {r['load_unverified_s']:.2f} s, with verify {r['load_with_new_verify_s']:.2f} s",
                flush=True,
            )
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
