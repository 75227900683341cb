"""Offline HF <-> megatron conversion of whole checkpoint directories (`archer convert`).

`model/convert.py` maps the tensors; this module reads and writes the files. The megatron
side is a directory of per-rank safetensors files, one per model shard:

    <dir>/archer_mcore.json                   {"shape": ModelShape, "tp", "pp",
                                               "padded_vocab", "te_names", "hf_config"}
    <dir>/mp_rank_{tp:02d}_{pp:03d}/model.safetensors   megatron state-dict names

(the HF config travels along so that `--to-hf` writes a complete HF directory).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from archer_mcore.model.convert import hf_to_mcore_shard, mcore_shards_to_hf
from archer_mcore.model.hf_config import ModelShape, shape_from_hf_config
from archer_mcore.model.hf_io import HFCheckpointReader, write_hf_checkpoint
from archer_mcore.model.weights import bucketize

META_FILE = "archer_mcore.json"
HF_SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
)


def shard_dir(root: Path, tp_rank: int, pp_rank: int) -> Path:
    """The directory of the (tp_rank, pp_rank) shard under a megatron checkpoint root."""
    return root / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def hf_to_mcore_dir(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    tp: int = 1,
    pp: int = 1,
    te_names: bool = False,
    vocab_divisible_by: int = 128,
) -> Path:
    """Write the megatron shards of an HF checkpoint for a tp x pp layout."""
    hf_dir, out = Path(hf_dir), Path(out_dir)
    hf_config = json.loads((hf_dir / "config.json").read_text())
    shape = shape_from_hf_config(hf_config)
    padded = shape.padded_vocab_size(tp, vocab_divisible_by)
    reader = HFCheckpointReader(hf_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in range(pp):
        for t in range(tp):
            sd = hf_to_mcore_shard(
                reader.get,
                shape,
                tp=tp,
                pp=pp,
                tp_rank=t,
                pp_rank=p,
                padded_vocab=padded,
                te_names=te_names,
            )
            d = shard_dir(out, t, p)
            d.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    meta = {
        "shape": shape.to_dict(),
        "tp": tp,
        "pp": pp,
        "padded_vocab": padded,
        "te_names": te_names,
        "hf_config": hf_config,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    return out


def mcore_dir_to_hf(
    mcore_dir: str | Path, out_dir: str | Path, shard_bytes: int = 5 * 1024**3
) -> Path:
    """Merge the megatron shards written by `hf_to_mcore_dir` into an HF checkpoint."""
    src, out = Path(mcore_dir), Path(out_dir)
    meta_path = src / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: not a megatron checkpoint written by archer convert"
        )
    meta = json.loads(meta_path.read_text())
    shape = ModelShape(**meta["shape"])
    tp, pp = int(meta["tp"]), int(meta["pp"])
    shards = {}
    for p in range(pp):
        for t in range(tp):
            f = shard_dir(src, t, p) / "model.safetensors"
            if not f.is_file():
                raise FileNotFoundError(f"missing megatron shard {f}")
            shards[(t, p)] = load_file(str(f))
    hf = mcore_shards_to_hf(shards, shape, tp=tp, pp=pp, te_names=bool(meta.get("te_names", False)))
    shards = bucketize(hf.items(), shard_bytes)
    write_hf_checkpoint(shards, out, config=meta["hf_config"], single_file=True)
    for name in HF_SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out
