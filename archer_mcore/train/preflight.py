"""Checks of the things a config points at, run before any expensive start-up.

Each raises `ConfigError` naming the key and the file, directory, host or port, so
that `archer train` / `archer eval` fail in a second with one line (exit 2) instead of
a traceback from deep inside transformers, pyarrow or the metrics server minutes in:

- `check_model_path`: model.path is a directory with a readable config.json that is a
  JSON object with a supported model_type, and model.tokenizer (or model.path) holds
  tokenizer files;
- `check_data_files`: every data file is a regular file with a supported suffix, and
  a Parquet file is one (its magic bytes);
- `check_metrics_endpoint`: metrics.host is an address of this machine and
  metrics.port is free there.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Sequence
from pathlib import Path

from archer_mcore.config import Config, ConfigError
from archer_mcore.metrics.exporter import bind_host

#: files any one of which makes a directory loadable by transformers' AutoTokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
PARQUET_MAGIC = b"PAR1"


def check_model_path(cfg: Config) -> None:
    """model.path (when set) and the tokenizer directory it implies."""
    from archer_mcore.model.hf_config import SUPPORTED_MODEL_TYPES

    m = cfg.model
    if m.path:
        path = Path(m.path)
        if not path.exists():
            raise ConfigError(f"model.path: {path} does not exist")
        if not path.is_dir():
            raise ConfigError(f"model.path: {path} is not a directory (expected an HF model dir)")
        conf = path / "config.json"
        if not conf.is_file():
            raise ConfigError(f"model.path: {conf} does not exist")
        try:
            hf = json.loads(conf.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"model.path: {conf} is not valid JSON: {exc}") from None
        if not isinstance(hf, dict):
            raise ConfigError(
                f"model.path: {conf} must hold a JSON object, got {type(hf).__name__}"
            )
        if hf.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model.path: {conf}: model_type {hf.get('model_type')!r} is not supported "
                f"(expected one of {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
    source = m.tokenizer or m.path
    key = "model.tokenizer" if m.tokenizer else "model.path"
    if source:
        tok = Path(source)
        if not tok.is_dir():
            raise ConfigError(f"{key}: tokenizer directory {tok} does not exist")
        if not any((tok / name).is_file() for name in TOKENIZER_FILES):
            raise ConfigError(
                f"{key}: {tok} holds no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
                + ("; set model.tokenizer to a tokenizer directory" if key == "model.path" else "")
            )


def check_data_files(files: Sequence[str], key: str) -> None:
    """Every file exists, is a regular file, has a supported suffix, and a Parquet
    file starts and ends with the Parquet magic bytes."""
    for name in files:
        p = Path(name)
        if not p.exists():
            raise ConfigError(f"{key}: file {p} does not exist")
        if not p.is_file():
            raise ConfigError(f"{key}: {p} is not a file (a directory?); list the files themselves")
        suffix = p.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            size = p.stat().st_size
            with open(p, "rb") as f:
                head = f.read(4)
                f.seek(max(0, size - 4))
                tail = f.read(4)
            if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
                raise ConfigError(f"{key}: {p} is not a Parquet file (no PAR1 magic bytes)")
        elif suffix not in JSONL_SUFFIXES:
            raise ConfigError(
                f"{key}: {p} has an unsupported suffix {suffix or '(none)'!r} "
                f"(expected one of {', '.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)})"
            )


def check_metrics_endpoint(cfg: Config) -> None:
    """When metrics are on: metrics.host resolves to an address of this machine and
    metrics.port (unless 0: any free port) is free on it. The socket is closed again
    at once; the exporter binds it later in start-up."""
    mc = cfg.metrics
    if not mc.enabled:
        return
    host = bind_host(mc.host)
    try:
        infos = socket.getaddrinfo(host, mc.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"metrics.host: {mc.host!r} does not resolve ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # as the exporter's HTTP server does: a port left in TIME_WAIT is free
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"metrics.port: port {mc.port} on {mc.host} is already in use; choose "
                    "another metrics.port (0: any free port)"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(
                    f"metrics.host: {mc.host!r} is not an address of this machine"
                ) from None
            raise ConfigError(
                f"metrics.host/metrics.port: cannot listen on {mc.host}:{mc.port}: {exc.strerror}"
            ) from None


def preflight(cfg: Config) -> None:
    """All of the above for `archer train` (global rank 0 runs the metrics check)."""
    check_model_path(cfg)
    check_data_files(cfg.data.train_files, "data.train_files")
    check_data_files(cfg.data.eval_files, "data.eval_files")
