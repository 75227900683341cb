"""Read and write Hugging Face safetensors checkpoints (single file or sharded + index)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class HFCheckpointReader:
    """Lazy name -> tensor access to the safetensors files of an HF model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {self.dir}")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                        weight_map[k] = f.name
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def __call__(self, name: str) -> Tensor:
        return self.get(name)

    def get(self, name: str) -> Tensor:
        if name not in self.weight_map:
            raise KeyError(name)
        fname = self.weight_map[name]
        h = self._handles.get(fname)
        if h is None:
            path = self.dir / fname
            if not path.is_file():
                raise FileNotFoundError(f"{path} (listed in {INDEX_FILE}) does not exist")
            h = safe_open(str(path), framework="pt")
            self._handles[fname] = h
        return h.get_tensor(name)  # type: ignore[attr-defined]


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_hf_checkpoint(
    tensors: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor],
    out_dir: str | Path,
    shard_bytes: int = 5 * 1024**3,
    config: Mapping | None = None,
) -> list[Path]:
    """Write tensors as sharded safetensors plus index (or one ``model.safetensors`` if
    they fit in one shard). Streams: at most one shard is held in memory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[dict[str, Tensor]] = []
    paths: list[Path] = []
    weight_map: dict[str, str] = {}
    cur: dict[str, Tensor] = {}
    cur_bytes = 0
    total = 0

    def flush() -> None:
        nonlocal cur, cur_bytes
        if not cur:
            return
        name = f"model-{len(paths) + 1:05d}.safetensors.part"
        p = out / name
        save_file({k: v.contiguous() for k, v in cur.items()}, str(p), metadata={"format": "pt"})
        paths.append(p)
        shards.append({})
        for k in cur:
            weight_map[k] = name
        cur, cur_bytes = {}, 0

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if cur and cur_bytes + nbytes > shard_bytes:
            flush()
        cur[name] = t
        cur_bytes += nbytes
        total += nbytes
    flush()
    n = len(paths)
    final: list[Path] = []
    rename: dict[str, str] = {}
    for i, p in enumerate(paths):
        target = out / (SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        os.replace(p, target)
        rename[p.name] = target.name
        final.append(target)
    if n > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {k: rename[v] for k, v in weight_map.items()},
        }
        _fsync_write(out / INDEX_FILE, json.dumps(index, indent=2))
    if config is not None:
        _fsync_write(out / "config.json", json.dumps(dict(config), indent=2))
    return final
