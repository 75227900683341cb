"""Read and write Hugging Face safetensors checkpoints (single file or sharded + index).

The one HF writer (`write_hf_checkpoint`): `archer convert --to-hf`, the rollout's disk
weight sync and its FP8 export all write through it."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Files of a base model directory that are weights (not copied into a new checkpoint).
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


class HFWriteError(ValueError):
    """An HF checkpoint that cannot be written as asked (the message says why)."""


NamedTensorList = Sequence[tuple[str, Tensor]]


def _copy_base_files(base: Path, tmp: Path) -> None:
    """The base model directory's non-weight files (config.json, tokenizer, ...)."""
    if not (base / "config.json").is_file():
        raise HFWriteError(f"base model directory {base} has no config.json")
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILE_SUFFIXES) and f.name != INDEX_FILE:
            shutil.copy2(f, tmp / f.name)


def _write_shards(
    shards: Iterable[NamedTensorList], tmp: Path, out_dir: Path
) -> tuple[list[tuple[Path, list[str]]], int]:
    """Each non-empty shard as one safetensors file in `tmp` (names fixed later);
    returns [(file, tensor names)] and the total bytes."""
    written: list[tuple[Path, list[str]]] = []
    seen: dict[str, int] = {}
    total = 0
    for shard in shards:
        if not shard:
            continue
        k = len(written)
        tensors: dict[str, Tensor] = {}
        for name, t in shard:
            if name in seen or name in tensors:
                where = f"shards {seen[name]} and {k}" if name in seen else f"shard {k}"
                raise HFWriteError(f"HF checkpoint {out_dir}: repeats parameter {name!r} ({where})")
            tensors[name] = t.detach().to("cpu").contiguous()
            total += t.numel() * t.element_size()
        seen.update(dict.fromkeys(tensors, k))
        path = tmp / f"shard-{k:05d}.safetensors.part"
        save_file(tensors, str(path), metadata={"format": "pt"})
        written.append((path, list(tensors)))
    return written, total


def _publish_dir(tmp: Path, out: Path, replace: bool) -> None:
    """Move the finished `tmp` into place as `out`: renamed whole when `out` does not
    exist (or, with `replace`, after deleting it), else its files moved into `out`."""
    if out.exists() and replace:
        shutil.rmtree(out)
    if not out.exists():
        tmp.rename(out)
        return
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def write_hf_checkpoint(
    shards: Iterable[NamedTensorList],
    out_dir: str | Path,
    base_model_dir: str | Path | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    single_file: bool = False,
    replace: bool = False,
) -> list[str]:
    """Write an HF checkpoint directory: each non-empty shard of `shards` (lists of
    (name, tensor); `model.weights.bucketize` makes them from flat tensors) becomes one
    ``model-0000k-of-0000n.safetensors`` file, plus the index; with `single_file` a
    lone shard is ``model.safetensors`` without an index. `base_model_dir`: copy its
    non-weight files (config.json, tokenizer, ...); `config`: write it as config.json.

    Everything is written into a ``<out_dir>.partial`` sibling first, so a reader never
    sees a half-written checkpoint; then moved into place (`replace`: an existing
    `out_dir` is deleted first; otherwise the files are added to it). Streams: one
    shard is held at a time. Returns the parameter names written, in order; raises
    HFWriteError for a repeated name, no tensors at all, or a base without config.json.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if base_model_dir is not None:
            _copy_base_files(Path(base_model_dir), tmp)
        written, total = _write_shards(shards, tmp, out)
        if not written:
            raise HFWriteError(f"HF checkpoint {out}: no tensors to write")
        n = len(written)
        weight_map: dict[str, str] = {}
        for k, (path, names) in enumerate(written):
            final = (
                SINGLE_FILE
                if n == 1 and single_file
                else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            )
            os.replace(path, tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        if not (n == 1 and single_file):
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _fsync_write(tmp / INDEX_FILE, json.dumps(index, indent=2))
        if config is not None:
            _fsync_write(tmp / "config.json", json.dumps(dict(config), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_dir(tmp, out, replace)
    return list(weight_map)
