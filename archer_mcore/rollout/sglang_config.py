"""From the config's rollout / rollout.sglang sections to a running SGLangEngine.

Disaggregated (rollout.mode = disaggregated): the servers are already running
(rollout.sglang.server_urls, optionally behind rollout.sglang.router_url); the engine
checks their version, DP size, dtype and memory fraction against the config and takes
each server's TP size from rollout.sglang.server_tp_sizes or its /server_info.

Colocated (rollout.mode = colocated): the trainer's rank 0 launches num_servers servers
on its own host (server_command, tp_size GPUs each, --enable-memory-saver, random
weights until the first sync) and a router in front of them (router_policy). The
engine releases the servers' memory while the policy trains and resumes it for the
sync and the rollout (--enable-memory-saver on GPUs; on CPU the flag cannot start, as
torch-memory-saver preloads a CUDA hook library, and the calls have no effect).

API key (rollout.sglang.api_key_file; docs/sglang.md "Network exposure"): colocated, the
launched servers and router get a fresh per-launch key from a 0600 file in a private
temporary directory (removed at exit) unless the setting names one; disaggregated, the
engine sends the key of the named file (the Slurm script writes it) on every request.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from archer_mcore.parallel.host_address import HostAddressError, this_host_address
from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_launcher import (
    RouterArgs,
    SGLangServerArgs,
    new_api_key,
    read_api_key,
    write_api_key_file,
)
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig

log = logging.getLogger("archer.rollout")


class SGLangConfigError(ValueError):
    """A rollout.sglang setting that cannot work (names the key)."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_master_address(
    configured: str, server_urls: Sequence[str], env: Mapping[str, str] | None = None
) -> str:
    """The address the servers join the weight-update group at: this host's, where the
    trainer's rank 0 runs (this is called there).

    configured ("" = automatic): found here, not guessed by the job script (torchrun's
    rendezvous does not promise rank 0 the first node): the interface
    NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME names, else the source address of the route
    to the first remote server, else this host's name resolved
    (`parallel.host_address.this_host_address`). A loopback address while any server is
    on another host is refused: those servers would try to reach themselves."""
    remote = [u for u in server_urls if not is_loopback(urlparse(u).hostname or "")]
    addr = configured
    if not addr:
        peers = [urlparse(u).hostname or "" for u in remote or server_urls]
        try:
            addr = this_host_address(peers, env)
        except HostAddressError as e:
            raise SGLangConfigError(f"rollout.sglang.master_address is unset and {e}") from None
    if is_loopback(addr) and remote:
        raise SGLangConfigError(
            f"rollout.sglang.master_address resolves to {addr!r} (loopback) but server "
            f"{remote[0]} is on another host and could not reach it; set "
            "rollout.sglang.master_address to this node's routable address"
        )
    return addr


def client_config(s: Any, api_key: str | None = None) -> ClientConfig:
    """rollout.sglang.{max_concurrency, request_timeout_s, max_retries}, plus the API key
    sent on every request. The health probe after a failed request gets request_timeout_s
    too: SGLang's /health_generate makes a token and waits behind running batches and
    weight updates, so a short probe would mark a busy server dead."""
    return ClientConfig(
        max_concurrency=s.max_concurrency,
        request_timeout_s=s.request_timeout_s,
        max_retries=s.max_retries,
        api_key=api_key,
    )


def launch_key_file(configured: str) -> str:
    """The API-key file of servers this process launches: rollout.sglang.api_key_file if
    set (checked readable by its owner only), else a fresh key in a new 0700 temporary
    directory removed when this process exits."""
    if configured:
        read_api_key(configured)
        return configured
    folder = tempfile.mkdtemp(prefix="archer-sglang-key-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(write_api_key_file(Path(folder) / "api_key.yaml", new_api_key()))


def disaggregated_api_key(configured: str) -> str | None:
    """The key of rollout.sglang.api_key_file for servers started elsewhere; None (with a
    warning) when the setting is empty."""
    if configured:
        return read_api_key(configured)
    log.warning(
        "rollout.sglang.api_key_file is empty: the SGLang servers are used without "
        "an API key, and anyone who can reach them can change their weights"
    )
    return None


def sync_config(
    rollout: Any,
    output_dir: str | Path,
    *,
    base_model_dir: str | Path | None,
    master_address: str,
    device: str,
) -> WeightSyncConfig:
    """rollout.weight_sync and rollout.sglang.{sync_backend, sync_timeout_s}."""
    s = rollout.sglang
    mode = "distributed" if rollout.weight_sync in ("distributed", "nccl") else rollout.weight_sync
    return WeightSyncConfig(
        mode=mode,
        backend=s.sync_backend,
        master_address=master_address,
        device="cpu" if s.sync_backend == "gloo" else device,
        disk_dir=str(Path(output_dir) / "weight_sync"),
        base_model_dir=None if base_model_dir is None else str(base_model_dir),
        timeout_s=s.sync_timeout_s,
        fp8=bool(rollout.fp8),
    )


def expected_server_fields(s: Any, fp8: bool = False) -> dict[str, tuple[str, Any]]:
    """/server_info fields every server must report: field -> (config key, value).
    "quantization" -> ("rollout.fp8", fp8) is not compared for equality but by
    sglang_servers.check_quantization (the server's --quantization or its checkpoint's
    quantization_config against rollout.fp8)."""
    from archer_mcore.rollout.sglang_servers import QUANTIZATION_FIELD

    out: dict[str, tuple[str, Any]] = {
        "mem_fraction_static": ("rollout.sglang.mem_fraction_static", s.mem_fraction_static),
        QUANTIZATION_FIELD: ("rollout.fp8", bool(fp8)),
    }
    if s.dtype != "auto":
        out["dtype"] = ("rollout.sglang.dtype", s.dtype)
    return out


def write_server_model_dir(hf_config: Mapping[str, Any], out: Path, fp8: bool) -> Path:
    """A model directory launched servers start from: config.json only; they load
    random weights (--load-format dummy) until the loop's first sync. With fp8 the
    config carries the block-wise FP8 quantization_config, so the server builds FP8
    linear layers whose weights and scales each sync replaces."""
    from archer_mcore.rollout.fp8_export import quantization_config

    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(hf_config)
    if fp8:
        cfg["quantization_config"] = quantization_config("block")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def build_sglang_engine(
    cfg: Any, hf_config: Mapping[str, Any], work_dir: str | Path, device: str = "cuda"
) -> SGLangEngine:
    """The engine of rollout.engine = sglang (see the module docstring)."""
    r, s = cfg.rollout, cfg.rollout.sglang
    work = Path(work_dir)
    expect = expected_server_fields(s, fp8=bool(r.fp8))
    if r.mode == "disaggregated":
        if not s.server_urls:
            raise SGLangConfigError(
                "rollout.mode = disaggregated: list the running servers in "
                "rollout.sglang.server_urls (the Slurm script sets them and router_url)"
            )
        from archer_mcore.rollout.sglang_servers import ServerHandle

        tps = list(s.server_tp_sizes) or [None] * len(s.server_urls)
        servers = [
            ServerHandle(url=u, num_gpus=tp or 1, num_gpus_from_config=tp is not None)
            for u, tp in zip(s.server_urls, tps)
        ]
        master = resolve_master_address(s.master_address, s.server_urls)
        sync = sync_config(
            r,
            cfg.train.output_dir,
            base_model_dir=cfg.model.path or None,
            master_address=master,
            device=device,
        )
        client = client_config(s, disaggregated_api_key(s.api_key_file))
        return SGLangEngine(
            servers,
            router_url=s.router_url or None,
            client=client,
            weight_sync=sync,
            health_deadline_s=s.health_timeout_s,
            health_probe_timeout_s=s.request_timeout_s,
            expect_server=expect,
        )
    # colocated: launch on this host
    model_dir = write_server_model_dir(hf_config, work / "sglang_model", bool(r.fp8))
    launch = tuple(s.server_command) or (sys.executable, "-m", "sglang.launch_server")
    router_launch = tuple(s.router_command) or (sys.executable, "-m", "sglang_router.launch_router")
    ports = [s.base_port + k for k in range(s.num_servers)]
    key_file = launch_key_file(s.api_key_file)
    client = client_config(s, read_api_key(key_file))
    args = [
        SGLangServerArgs(
            model_path=str(model_dir),
            port=p,
            host=s.host,
            tp_size=s.tp_size,
            mem_fraction_static=s.mem_fraction_static,
            dtype=s.dtype,
            random_seed=cfg.train.seed,
            load_format="dummy",
            # torch-memory-saver preloads a CUDA hook (needs libcuda): GPU
            # only; on CPU release/resume answer 200 and change nothing
            enable_memory_saver=device != "cpu",
            cuda_visible_devices=None
            if device == "cpu"
            else ",".join(str(k * s.tp_size + g) for g in range(s.tp_size)),
            extra_args=tuple(s.extra_server_args),
            api_key_file=key_file,
        )
        for k, p in enumerate(ports)
    ]
    router = RouterArgs(
        worker_urls=tuple(a.url for a in args),
        port=s.router_port,
        host=s.host,
        policy=s.router_policy,
        api_key_file=key_file,
    )
    master = resolve_master_address(s.master_address or "127.0.0.1", [a.url for a in args])
    sync = sync_config(
        r, cfg.train.output_dir, base_model_dir=model_dir, master_address=master, device=device
    )
    return SGLangEngine.launch(
        args,
        work / "logs",
        router=router,
        server_launch=launch,
        router_launch=router_launch,
        health_deadline_s=s.health_timeout_s,
        client=client,
        weight_sync=sync,
        memory_saver=True,
        health_probe_timeout_s=s.request_timeout_s,
        expect_server=expect,
    )
