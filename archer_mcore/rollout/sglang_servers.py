"""The engine's SGLang servers: their registry (ServerHandle), the start-up checks
(GET /server_info: version, DP, TP, launch flags), target choice for generation, failure
probes, marking a server dead, restarting launched servers, router membership, memory
release/resume (colocated) and fan-out requests to every live server.

`ServerPool` is the base class of the engine (sglang_weights.WeightSyncClient, then
sglang_engine.SGLangEngine); it holds no state of its own: the attributes it reads are
declared here and set by SGLangEngine.__init__.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from archer_mcore.rollout.http_client import AsyncJsonClient, RequestFailed
from archer_mcore.rollout.sglang_launcher import ManagedProcess, wait_healthy
from archer_mcore.rollout.sglang_protocol import (
    WeightSyncConfig,
    check_server_version,
    redact_secrets,
)
from archer_mcore.rollout.types import EngineHealth, RolloutError

T = TypeVar("T")
log = logging.getLogger("archer.rollout")


#: expect_server field checked by `check_quantization`, not by equality: SGLang 0.5.23
#: does not report a checkpoint's quantization in /server_info (see server_quantization).
QUANTIZATION_FIELD = "quantization"


@dataclass(frozen=True, kw_only=True)
class ServerQuantization:
    """The quantization a server's linear layers run. method: SGLang's name ("fp8", ...)
    or None (unquantized); block: the checkpoint's weight_block_size (block-wise FP8),
    else None; known: False when neither /server_info nor a readable config.json says;
    source: where it was read, for messages."""

    method: str | None
    block: tuple[int, ...] | None
    known: bool
    source: str


def _quant_of(cfg: Any, source: str) -> ServerQuantization | None:
    """A config dict's quantization_config, or None when it has no such entry."""
    qc = cfg.get("quantization_config") if isinstance(cfg, Mapping) else None
    if not isinstance(qc, Mapping):
        return None
    method = str(qc.get("quant_method") or "unknown").lower()
    block = qc.get("weight_block_size")
    return ServerQuantization(
        method=method,
        block=tuple(int(b) for b in block) if block else None,
        known=True,
        source=f"{source} quantization_config (quant_method {method!r}"
        f"{f', weight_block_size {list(block)}' if block else ''})",
    )


def server_quantization(info: Mapping[str, Any]) -> ServerQuantization:
    """What a server's /server_info says about its quantization, as SGLang 0.5.23
    resolves it (`configs/model_config.py` ModelConfig._verify_quantization): the
    --quantization flag (/server_info `quantization`) if set, else the checkpoint's
    `quantization_config`, from --json-model-override-args or the config.json under
    /server_info `model_path`. The checkpoint's method is not in /server_info (for
    Qwen3 `quantization` stays null for an FP8 checkpoint; only some architectures'
    overrides copy it there) nor in /model_info, so the config.json is read on this
    host: colocated servers start from a directory this process wrote, disaggregated
    ones from ARCHER_SGLANG_MODEL, readable here on a shared file system. An unreadable,
    relative or non-local model_path (a hub id) gives known = False."""
    flag = info.get("quantization")
    overrides: Any = info.get("json_model_override_args") or "{}"
    try:
        overrides = json.loads(overrides) if isinstance(overrides, str) else overrides
    except ValueError:
        overrides = {}
    from_overrides = _quant_of(overrides, "--json-model-override-args")
    model_path = str(info.get("model_path") or "")
    checkpoint: ServerQuantization | None = None
    # a relative path is the server's (its working directory), not this host's
    config = Path(model_path) / "config.json" if Path(model_path).is_absolute() else None
    known = False
    if config is not None:
        try:
            checkpoint = _quant_of(json.loads(config.read_text()), f"checkpoint {config}")
            known = True
        except (OSError, ValueError):
            pass
    ckpt = from_overrides or checkpoint
    if flag:
        method = str(flag).lower()
        block = ckpt.block if ckpt is not None and ckpt.method == method else None
        extra = f", {ckpt.source}" if ckpt is not None else ""
        return ServerQuantization(
            method=method, block=block, known=True, source=f"--quantization {flag}{extra}"
        )
    if ckpt is not None:
        return ckpt
    if known:
        return ServerQuantization(
            method=None,
            block=None,
            known=True,
            source=f"checkpoint {config} without quantization_config, no --quantization",
        )
    return ServerQuantization(
        method=None,
        block=None,
        known=False,
        source=f"no --quantization; checkpoint {model_path!r} not readable on this host",
    )


def check_quantization(url: str, info: Mapping[str, Any], key: str, fp8: bool) -> None:
    """Refuse a server whose quantization does not match `key` (rollout.fp8). FP8 syncs
    send e4m3 weights plus `<name>_scale_inv` blocks of 128x128 (fp8_export), which only
    a server started from a block-wise FP8 checkpoint has parameters for (a bf16 server
    fails the first sync with a KeyError in its loader); bf16 syncs into FP8 parameters
    are copied into e4m3 storage beside stale scales, raising nothing. A server whose
    quantization cannot be read here is accepted with a warning."""
    q = server_quantization(info)
    if not q.known:
        log.warning(
            "SGLang server %s: could not tell whether it runs FP8 (%s); %s = %s is "
            "not checked against it",
            url,
            q.source,
            key,
            fp8,
        )
        return
    from archer_mcore.rollout.fp8_export import DEFAULT_BLOCK

    if fp8 and (q.method != "fp8" or q.block != DEFAULT_BLOCK):
        raise RolloutError(
            f"SGLang server {url} runs quantization = {q.method!r} ({q.source}) but {key} = "
            f"true: FP8 syncs send e4m3 weights and *_scale_inv blocks of {list(DEFAULT_BLOCK)} "
            "that only a server started from a block-wise FP8 checkpoint (quantization_config "
            f"quant_method 'fp8', weight_block_size {list(DEFAULT_BLOCK)}) can load (other "
            "servers fail the first sync with a KeyError); start the servers from such a "
            f"checkpoint (fp8_export.export_fp8_checkpoint) or set {key}: false"
        )
    if not fp8 and q.method is not None:
        raise RolloutError(
            f"SGLang server {url} runs quantization = {q.method!r} ({q.source}) but {key} = "
            "false: unquantized syncs would be copied into its quantized parameters beside "
            f"stale scales (wrong rollouts, no error); set {key}: true (block-wise FP8 "
            "servers) or start the servers from an unquantized checkpoint without --quantization"
        )


@dataclass(kw_only=True)
class ServerHandle:
    """One SGLang server: url, GPUs it adds to the weight group, its process if we
    launched it, and its state. `stale`: alive but weights older than the engine's."""

    url: str
    num_gpus: int = 1  # TP workers = ranks in the weight-update group
    process: ManagedProcess | None = None
    num_gpus_from_config: bool = False  # else taken from the server's /server_info
    health_path: str = "/health"
    # after a failed request: /health_generate makes the server generate a token, so a
    # server that still accepts connections but no longer generates counts as down
    probe_path: str = "/health_generate"
    dead: bool = False
    stale: bool = False
    last_error: str = ""

    @property
    def usable(self) -> bool:
        return not self.dead and not self.stale


class ServerPool:
    """Server registry, health and router membership of an SGLangEngine (see module doc)."""

    servers: list[ServerHandle]
    router_url: str | None
    sync_cfg: WeightSyncConfig
    restart_dead_servers: bool
    expect_server: dict[str, tuple[str, Any]]
    health_deadline_s: float
    health_probe_timeout_s: float
    server_info: dict[str, dict[str, Any]]
    session_log: collections.deque[str]
    _client: AsyncJsonClient
    _loop: asyncio.AbstractEventLoop
    _rr: itertools.count[int]
    _version: int
    _syncing: bool
    _pg_invalid: bool
    _released: set[str]
    _last_checkpoint: Path | None
    _restarts: dict[str, asyncio.Task[None]]

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the engine's event-loop thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _load_from_disk(self, server: ServerHandle, path: Path, version: int) -> None:
        """Provided by sglang_weights.WeightSyncClient (a restarted server reloads the
        last disk checkpoint)."""
        raise NotImplementedError

    async def _check_servers(self) -> None:
        """Version, DP size and TP size of every server (GET /server_info; SGLang 0.5.23
        `entrypoints/http_server.py` also serves it as the deprecated /get_server_info),
        and the expect_server fields: equal values, except QUANTIZATION_FIELD
        (check_quantization: rollout.fp8 against the server's quantization)."""
        for s in self.servers:
            try:
                info = await self._client.request(
                    "GET", s.url + "/server_info", timeout_s=self.health_probe_timeout_s
                )
            except RequestFailed as e:
                if e.status != 404:
                    raise RolloutError(
                        f"SGLang server {s.url}: GET /server_info failed: {e}"
                    ) from e
                info = await self._client.request(
                    "GET", s.url + "/get_server_info", timeout_s=self.health_probe_timeout_s
                )
            if not isinstance(info, dict):
                raise RolloutError(
                    f"SGLang server {s.url}: malformed /server_info {str(info)[:200]}"
                )
            # it reports the server's --api-key, also inside launch_command
            info = redact_secrets(info, [self._client.cfg.api_key or ""])
            check_server_version(s.url, str(info.get("version", "")))
            dp = int(info.get("dp_size", 1) or 1)
            if dp != 1 and self.sync_cfg.mode != "disk":
                raise RolloutError(
                    f"SGLang server {s.url} runs --dp-size {dp}: SGLang refuses {self.sync_cfg.mode} "
                    "weight updates for dp_size > 1 (tokenizer manager: assert dp_size == 1); "
                    "run one server per data-parallel replica instead"
                )
            tp = int(info.get("tp_size", 1) or 1)
            if s.num_gpus_from_config and s.num_gpus != tp:
                raise RolloutError(
                    f"SGLang server {s.url}: configured with TP {s.num_gpus} but reports tp_size {tp}"
                )
            s.num_gpus = tp
            for fld, (key, want) in self.expect_server.items():
                if fld == QUANTIZATION_FIELD:
                    check_quantization(s.url, info, key, bool(want))
                    continue
                got = info.get(fld)
                same = (
                    abs(float(got) - float(want)) < 1e-9
                    if isinstance(want, float) and got is not None
                    else got == want
                )
                if not same:
                    raise RolloutError(
                        f"SGLang server {s.url} runs {fld} = {got!r} but {key} = {want!r}; "
                        "start the servers with the configured value"
                    )
            self.server_info[s.url] = info

    def _pick_target(self) -> tuple[str, ServerHandle | None]:
        if self.router_url is not None:
            return self.router_url, None
        live = [s for s in self.servers if s.usable]
        if not live:
            detail = "; ".join(
                f"{s.url}: {s.last_error or ('stale weights' if s.stale else 'down')}"
                for s in self.servers
            )
            raise RolloutError(
                f"no live SGLang server left ({len(self.servers)} configured): {detail}"
            )
        server = live[next(self._rr) % len(live)]
        return server.url, server

    async def _abort_rid(self, server: ServerHandle | None, rid: str) -> None:
        """Abort one request on the worker that has it; through a router (which has no
        /abort_request in sglang-router 0.3.2) the worker is unknown, so every live worker
        gets the abort (an unknown rid is a no-op there). Best effort, short timeout."""
        targets = [server] if server is not None else [s for s in self.servers if not s.dead]
        for s in targets:
            with contextlib.suppress(RequestFailed):
                await self._client.request_once(
                    "POST", s.url + "/abort_request", json={"rid": rid}, timeout_s=10.0
                )

    async def _check_workers(self, error: str) -> None:
        """After a failed routed request: probe every live worker (concurrently) and mark
        those that do not answer dead (and out of the router)."""
        live = [s for s in self.servers if not s.dead]
        await asyncio.gather(
            *(self._on_server_failure(s, f"routed request failed: {error}") for s in live)
        )

    def _dead_summary(self) -> str:
        dead = [f"{s.url} ({s.last_error[:200]})" for s in self.servers if s.dead]
        return f"; SGLang servers down: {', '.join(dead)}" if dead else ""

    async def _probe(self, server: ServerHandle) -> bool:
        if server.process is not None and not server.process.alive:
            return False
        try:
            await self._client.request_once(
                "GET", server.url + server.probe_path, timeout_s=self.health_probe_timeout_s
            )
            return True
        except RequestFailed:
            return False

    async def _on_server_failure(self, server: ServerHandle, error: str) -> None:
        if server.dead:
            return
        if self._syncing and (server.process is None or server.process.alive):
            return  # a probe would wait on the update lock; judged after the sync
        if await self._probe(server):
            return
        await self._mark_dead(server, error)

    async def _mark_dead(self, server: ServerHandle, error: str) -> None:
        server.dead = True
        server.last_error = error
        live = sum(not s.dead for s in self.servers)
        log.warning(
            "SGLang server %s is down (%s); %d live server(s) left", server.url, error[:300], live
        )
        await self._router_remove(server)
        running = self._restarts.get(server.url)
        if (
            server.process is not None
            and self.restart_dead_servers
            and (running is None or running.done())
        ):
            self._restarts[server.url] = asyncio.create_task(self._restart(server))

    async def _restart(self, server: ServerHandle) -> None:
        """Stop, start and wait for one launched server; then bring its weights up to
        date (disk) or mark it stale until the next broadcast sync."""
        assert server.process is not None
        proc = server.process
        await asyncio.to_thread(proc.stop)
        proc.start()
        try:
            await asyncio.to_thread(
                wait_healthy, server.url, self.health_deadline_s, proc, server.health_path
            )
        except RolloutError as e:
            server.last_error = f"restart failed: {e}"
            return
        if self._version > 0:
            if self.sync_cfg.mode == "disk" and self._last_checkpoint is not None:
                try:
                    await self._load_from_disk(server, self._last_checkpoint, self._version)
                except RolloutError as e:
                    server.last_error = f"weight reload after restart failed: {e}"
                    return
            else:
                server.stale = True  # rejoins (and the router) at the next update_weights
                self._pg_invalid = True
        server.dead = False
        server.last_error = ""
        if not server.stale:
            await self._router_add(server)

    # -- router membership (sglang-router 0.3.x: GET/POST /workers, DELETE /workers/{id})
    async def _router_remove(self, server: ServerHandle) -> None:
        """Take a dead (or stale) server out of the router, best effort: the router's own
        health checks would drop it too, but might re-admit a restarted server whose
        weights are not current."""
        if self.router_url is None:
            return
        try:
            listing = await self._client.request_once(
                "GET", self.router_url + "/workers", timeout_s=self.health_probe_timeout_s
            )
            for w in listing.get("workers", []) if isinstance(listing, dict) else []:
                if w.get("url") == server.url and "id" in w:
                    await self._client.request_once(
                        "DELETE",
                        f"{self.router_url}/workers/{w['id']}",
                        timeout_s=self.health_probe_timeout_s,
                    )
        except RequestFailed as e:
            server.last_error += f"; router removal failed: {e}"

    async def _router_add(self, server: ServerHandle) -> None:
        """POST /workers; with an API key the body carries it too (sglang-router 0.3.2
        WorkerConfigRequest.api_key: the key it sends to that worker; without it the
        router probes a re-added worker unauthenticated and never admits it)."""
        if self.router_url is None:
            return
        body = {"url": server.url}
        if self._client.cfg.api_key:
            body["api_key"] = self._client.cfg.api_key
        try:
            await self._client.request_once(
                "POST",
                self.router_url + "/workers",
                json=body,
                timeout_s=self.health_probe_timeout_s,
            )
        except RequestFailed as e:
            server.last_error = f"router re-admission failed: {e}"

    async def _check_processes(self) -> None:
        """Notice launched servers whose process has exited (cheap: no HTTP)."""
        for s in self.servers:
            if s.process is not None and not s.dead and not s.process.alive:
                await self._on_server_failure(s, f"process exited with code {s.process.returncode}")

    async def _memory(self, path: str, tags: list[str]) -> None:
        """Release or resume GPU memory of every live server (colocated mode,
        --enable-memory-saver; on CPU SGLang 0.5.23 answers 200 and does nothing)."""
        self.session_log.append(f"{path.strip('/')}:{'+'.join(tags)}")
        await self._fanout(
            "POST", path, {"tags": tags}, quiet=False, timeout_s=self.sync_cfg.timeout_s
        )
        if path == "/release_memory_occupation":
            self._released |= set(tags)
        else:
            self._released -= set(tags)

    async def _abort_all(self, quiet: bool) -> None:
        await self._fanout("POST", "/abort_request", {"abort_all": True}, quiet=quiet)

    async def _fanout(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        quiet: bool,
        servers: Sequence[ServerHandle] | None = None,
        timeout_s: float | None = None,
    ) -> list[Any]:
        targets = [s for s in (servers if servers is not None else self.servers) if not s.dead]
        replies = await asyncio.gather(
            *(
                self._client.request(
                    method, s.url + path, json=body, timeout_s=timeout_s, retries=0
                )
                for s in targets
            ),
            return_exceptions=True,
        )
        for s, r in zip(targets, replies):
            if isinstance(r, BaseException) and not quiet:
                raise RolloutError(f"{method} {s.url}{path} failed: {r}") from r
        return list(replies)

    async def _health(self) -> EngineHealth:
        lines = []
        ok = True
        if self._syncing:  # probes would wait on the update lock and misjudge servers
            return EngineHealth(True, ("weight sync in progress: not probed",))
        for s in self.servers:
            alive = await self._probe(s)
            if not alive and not s.dead:
                await self._on_server_failure(s, "health probe failed")
            state = "stale" if s.stale else ("healthy" if alive else "DOWN")
            ok &= alive and not s.stale
            lines.append(f"{s.url}: {state}{' (' + s.last_error + ')' if s.last_error else ''}")
        if self.router_url is not None:
            try:
                await self._client.request_once(
                    "GET", self.router_url + "/health", timeout_s=self.health_probe_timeout_s
                )
                lines.append(f"router {self.router_url}: healthy")
            except RequestFailed as e:
                ok = False
                lines.append(f"router {self.router_url}: DOWN ({e})")
        return EngineHealth(ok, tuple(lines))

    def wait_for_restarts(self, timeout_s: float | None = None) -> None:
        """Block until background restarts finish (for tests and orderly shutdown)."""

        async def _wait() -> None:
            tasks = [t for t in self._restarts.values() if not t.done()]
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

        self._run(_wait(), timeout=timeout_s)
