"""Rollout engine over SGLang servers (optionally behind sglang-router).

Generation: one POST /generate per sample (input_ids, return_logprob, ids only), sent
to the router if there is one, else round-robin over the live servers. Each sample
slot (prompt i, sample j) is filled at most once: a failed attempt (connection lost,
timeout, 5xx) is aborted on its server (best effort) and retried with a new request id
on a live server; its late answer, if any, is never read. When a slot runs out of
retries, or no server is left, the step fails with a RolloutError naming the sample,
server and last error, and no partial batch is returned.

Failure handling: a server that fails a request is probed (GET /health_generate, with
a long timeout: SGLang's health endpoints generate a token and wait while a weight
update holds the model lock); if the probe fails it is marked dead and gets no more
requests. No probe is sent while a weight sync runs. Aborts go to each worker's own URL
(sglang-router 0.3.2 has no /abort_request). With `restart_dead_servers` and a
launcher-managed process, a dead server is restarted in the background and rejoins
once healthy, after its weights are brought up to date: re-loaded from the last disk
checkpoint, or (broadcast path) it waits for the next update_weights, which rebuilds
the weight-update group.

Weight sync (protocol of SGLang 0.5.21 ... 0.5.23; `check_servers` refuses other versions):
sglang_weights.py. Server registry, health, restarts and router membership:
sglang_servers.py. Request bodies and reply parsing: sglang_protocol.py.

The engine runs its own asyncio loop in a daemon thread; its public methods are
synchronous and thread-safe (pause() may be called while generate() runs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from archer_mcore.rollout.http_client import (
    AsyncJsonClient,
    ClientConfig,
    RequestFailed,
    backoff_delay,
)
from archer_mcore.rollout.sglang_launcher import (
    SGLANG_ROUTER_LAUNCH,
    SGLANG_SERVER_LAUNCH,
    ManagedProcess,
    RouterArgs,
    SGLangServerArgs,
    build_router_command,
    build_server_command,
    free_port,
    server_env,
    wait_healthy,
)
from archer_mcore.rollout.sglang_protocol import (
    WeightSyncConfig,
    generate_payload,
    parse_generate_reply,
)
from archer_mcore.rollout.sglang_servers import ServerHandle
from archer_mcore.rollout.sglang_weights import WeightSyncClient
from archer_mcore.rollout.types import (
    EngineHealth,
    EnginePausedError,
    RolloutBatch,
    RolloutError,
    Sample,
    SamplingParams,
)
from archer_mcore.rollout.weight_sync import destroy_weight_update_group

log = logging.getLogger("archer.rollout")


class SGLangEngine(WeightSyncClient):
    """RolloutEngine over running SGLang servers. Use `SGLangEngine.launch` to start
    servers (and a router) as child processes, or pass the URLs of running ones."""

    def __init__(
        self,
        servers: Sequence[ServerHandle | str],
        *,
        router_url: str | None = None,
        router_process: ManagedProcess | None = None,
        client: ClientConfig | None = None,
        weight_sync: WeightSyncConfig | None = None,
        restart_dead_servers: bool = False,
        health_deadline_s: float = 600.0,
        health_probe_timeout_s: float = 120.0,
        check_servers: bool = True,
        expect_server: dict[str, tuple[str, Any]] | None = None,
        memory_saver: bool = False,
    ) -> None:
        """check_servers: at start, read each server's GET /server_info: refuse versions
        outside SUPPORTED_SGLANG and servers with dp_size > 1, and take each server's TP
        size (its ranks in the weight-update group) from it. health_probe_timeout_s is long
        on purpose: SGLang's health endpoints generate a token and wait for the model lock
        (held during weight updates and by busy batches). expect_server: /server_info
        field -> (config key, required value), checked at start. memory_saver: colocated
        servers started with --enable-memory-saver: pause() releases their GPU memory
        (weights and KV cache), a sync brings the weights back first, resume() the KV
        cache."""
        if not servers:
            raise ValueError("SGLangEngine needs at least one server")
        self.servers = [s if isinstance(s, ServerHandle) else ServerHandle(url=s) for s in servers]
        self.router_url = router_url
        self.router_process = router_process
        self.client_cfg = client or ClientConfig()
        self.sync_cfg = weight_sync or WeightSyncConfig()
        self.restart_dead_servers = restart_dead_servers
        self.expect_server = dict(expect_server or {})
        self.memory_saver = memory_saver
        self._released: set[str] = set()  # memory tags released (colocated)
        self.health_deadline_s = health_deadline_s
        self.health_probe_timeout_s = health_probe_timeout_s
        self._version = 0
        self._paused = threading.Event()
        self._rr = itertools.count()
        self._pg: Any = None
        self._pg_invalid = False
        self._group_members: list[ServerHandle] = []
        self._last_checkpoint: Path | None = None
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self._syncing = False
        self.server_info: dict[str, dict[str, Any]] = {}
        # the last weight-update calls, in order (tests read it)
        self.session_log: collections.deque[str] = collections.deque(maxlen=256)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sglang-engine", daemon=True
        )
        self._thread.start()
        self._client: AsyncJsonClient = self._run(self._make_client())
        self._closed = False
        if check_servers:
            try:
                self._run(self._check_servers())
            except BaseException:
                self.shutdown()
                raise

    # -- construction from launch args ------------------------------------------------
    @classmethod
    def launch(
        cls,
        server_args: Sequence[SGLangServerArgs],
        log_dir: str | Path,
        *,
        router: RouterArgs | Literal["auto"] | None = "auto",
        server_launch: Sequence[str] = SGLANG_SERVER_LAUNCH,
        router_launch: Sequence[str] = SGLANG_ROUTER_LAUNCH,
        health_deadline_s: float = 900.0,
        **kwargs: Any,
    ) -> SGLangEngine:
        """Start every server, wait until all are healthy (deadline), start the router in
        front of them (router="auto": on a free port with the cache_aware policy; None: no
        router), and return the engine. On any failure all started processes are stopped."""
        handles: list[ServerHandle] = []
        router_proc: ManagedProcess | None = None
        log_dir = Path(log_dir)
        try:
            for a in server_args:
                if a.dp_size != 1:
                    raise RolloutError(
                        f"server on port {a.port}: dp_size {a.dp_size} > 1 is refused: SGLang's "
                        "distributed and tensor weight updates assert dp_size == 1; launch one "
                        "server per replica instead"
                    )
            for k, a in enumerate(server_args):
                p = ManagedProcess(
                    build_server_command(a, server_launch),
                    server_env(a),
                    log_dir / f"sglang_server_{k}_{a.port}.log",
                )
                p.start()
                handles.append(
                    ServerHandle(
                        url=a.url, num_gpus=a.tp_size, process=p, num_gpus_from_config=True
                    )
                )
            for h in handles:
                wait_healthy(h.url, health_deadline_s, h.process)
            router_url = None
            if router is not None:
                ra = (
                    router
                    if isinstance(router, RouterArgs)
                    else RouterArgs(worker_urls=tuple(h.url for h in handles), port=free_port())
                )
                router_proc = ManagedProcess(
                    build_router_command(ra, router_launch),
                    None,
                    log_dir / f"sglang_router_{ra.port}.log",
                )
                router_proc.start()
                wait_healthy(ra.url, health_deadline_s, router_proc)
                router_url = ra.url
        except BaseException:
            for h in handles:
                if h.process is not None:
                    h.process.stop()
            if router_proc is not None:
                router_proc.stop()
            raise
        return cls(
            handles,
            router_url=router_url,
            router_process=router_proc,
            health_deadline_s=health_deadline_s,
            **kwargs,
        )

    # -- loop plumbing ----------------------------------------------------------------
    async def _make_client(self) -> AsyncJsonClient:
        return AsyncJsonClient(self.client_cfg)

    @property
    def weight_version(self) -> int:
        return self._version

    # -- generation -------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
    ) -> RolloutBatch:
        if self._paused.is_set():
            raise EnginePausedError("SGLangEngine.generate called while paused")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RolloutError(f"prompt {i} is empty")
        return self._run(self._generate([list(map(int, p)) for p in prompts], n, params))

    async def _generate(
        self, prompts: list[list[int]], n: int, params: SamplingParams
    ) -> RolloutBatch:
        await self._check_processes()
        step = uuid.uuid4().hex[:12]
        results: dict[tuple[int, int], Sample] = {}
        tasks = [
            asyncio.create_task(
                self._one_sample(step, i, j, prompt=prompts[i], params=params, results=results)
            )
            for i in range(len(prompts))
            for j in range(n)
        ]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._abort_all(quiet=True)
            raise
        groups = [[results[(i, j)] for j in range(n)] for i in range(len(prompts))]
        return RolloutBatch(groups)

    async def _one_sample(
        self,
        step: str,
        i: int,
        j: int,
        *,
        prompt: list[int],
        params: SamplingParams,
        results: dict[tuple[int, int], Sample],
    ) -> None:
        last_error = ""
        for attempt in range(self.client_cfg.max_retries + 1):
            if attempt > 0 and self._paused.is_set():
                # paused mid-step: the slot ends as aborted instead of being retried
                results[(i, j)] = Sample(
                    prompt_index=i,
                    sample_index=j,
                    prompt_ids=prompt,
                    token_ids=[],
                    logprobs=[],
                    finish_reason="abort",
                    weight_version=self._version,
                )
                return
            base, server = self._pick_target()
            rid = f"{step}-{i}-{j}-{attempt}"
            try:
                reply = await self._client.request_once(
                    "POST", base + "/generate", json=generate_payload(prompt, params, rid)
                )
            except RequestFailed as e:
                last_error = str(e)
                if not e.retryable:
                    raise RolloutError(f"sample ({i}, {j}): {e}") from e
                if e.timed_out:  # the server may still be generating it: abort that rid
                    await self._abort_rid(server, rid)
                if server is not None:
                    await self._on_server_failure(server, last_error)
                else:  # through the router: find out which worker is gone
                    await self._check_workers(last_error)
                    last_error += self._dead_summary()
                await asyncio.sleep(backoff_delay(attempt + 1, self.client_cfg))
                continue
            sample = parse_generate_reply(reply, i, j, prompt, default_version=self._version)
            if (i, j) in results:  # cannot happen: one task per slot; guard the invariant
                raise RolloutError(f"sample ({i}, {j}) answered twice")
            sample.request_id = rid
            results[(i, j)] = sample
            return
        raise RolloutError(
            f"sample (prompt {i}, sample {j}) failed after {self.client_cfg.max_retries + 1} "
            f"attempts; last error: {last_error}"
        )

    # -- control ----------------------------------------------------------------------
    def pause(self) -> None:
        self._paused.set()
        self._run(self._pause())

    async def _pause(self) -> None:
        await self._fanout("POST", "/pause_generation", {"mode": "abort"}, quiet=True)
        await self._abort_all(quiet=True)
        if self.memory_saver:
            # SGLang releases only an idle engine: paused and aborted above
            await self._memory("/release_memory_occupation", ["weights", "kv_cache"])

    def abort(self) -> None:
        """Abort every in-flight request (they end with finish reason "abort")."""
        self._run(self._abort_all(quiet=True))

    def resume(self) -> None:
        """Continue generation; colocated: resume what pause() released and is not back
        yet (normally the KV cache: the sync brought the weights back). Logs the memory
        and weight-update calls since the last resume, in order."""
        if self._released:
            self._run(self._memory("/resume_memory_occupation", sorted(self._released)))
        self._run(self._fanout("POST", "/continue_generation", {}, quiet=True))
        self._paused.clear()
        if self.session_log:
            log.info("sglang calls: %s", " ".join(self.session_log))
            self.session_log.clear()

    def health(self) -> EngineHealth:
        return self._run(self._health())

    def shutdown(self) -> None:
        """Stop launched processes, close the client and the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            for t in self._restarts.values():
                self._loop.call_soon_threadsafe(t.cancel)
            self._run(self._client.aclose(), timeout=10)
        finally:
            if self._pg is not None:
                with contextlib.suppress(Exception):
                    destroy_weight_update_group(self._pg)
                self._pg = None
            for s in self.servers:
                if s.process is not None:
                    s.process.stop()
            if self.router_process is not None:
                self.router_process.stop()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
