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
"distributed": the trainer broadcasts each bucket over a process group it forms with
every server TP worker; "tensor": colocated servers receive the tensors through
/update_weights_from_tensor (same host); both wrapped in POST /begin_weight_update ...
POST /end_weight_update (0.5.23 `managers/scheduler_components/weight_updater.py`
answers 400 otherwise). "disk": safetensors checkpoint + /update_weights_from_disk with
load_format "auto". See weight_sync.py and model/hf_io.py.

The engine runs its own asyncio loop in a daemon thread; its public methods are
synchronous and thread-safe (pause() may be called while generate() runs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import shutil
import threading
import uuid
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from archer_mcore.model.hf_io import write_hf_checkpoint
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
from archer_mcore.rollout.types import (
    EngineHealth,
    EnginePausedError,
    NamedTensorBucket,
    RolloutBatch,
    RolloutError,
    Sample,
    SamplingParams,
)
from archer_mcore.rollout.weight_sync import (
    broadcast_bucket,
    bucket_metadata,
    destroy_weight_update_group,
    init_weight_update_group,
    with_last_flag,
)

T = TypeVar("T")
log = logging.getLogger("archer.rollout")


#: SGLang versions whose weight-update protocol this engine speaks (begin/end sessions
#: appeared in 0.5.21; setup.py's gpu extra pins 0.5.23).
SUPPORTED_SGLANG = ((0, 5, 21), (0, 5, 23))


def parse_version(text: str) -> tuple[int, ...]:
    """"0.5.23" -> (0, 5, 23); suffixes such as "rc1" or "+cu12" are ignored."""
    out = []
    for part in str(text).split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        out.append(int(digits.group()))
    return tuple(out)


def check_server_version(url: str, version: str) -> None:
    """Raise RolloutError unless `version` is in SUPPORTED_SGLANG."""
    lo, hi = SUPPORTED_SGLANG
    v = parse_version(version)
    if not lo <= v[:3] <= hi:
        raise RolloutError(
            f"SGLang server {url} runs version {version!r}; this trainer speaks the weight-update "
            f"protocol of {'.'.join(map(str, lo))} to {'.'.join(map(str, hi))} (pin sglang==0.5.23)"
        )


@dataclass(frozen=True)
class WeightSyncConfig:
    """mode: "distributed" (broadcast from the trainer), "tensor" (colocated servers,
    /update_weights_from_tensor) or "disk" (checkpoint + /update_weights_from_disk).
    backend: process-group backend of the broadcast ("nccl"; "gloo" on CPU).
    master_address: an address of this (trainer rank 0) host the servers can reach
    (`default_master_address()`; 127.0.0.1 only when every server is local).
    device: where the trainer puts tensors before broadcasting ("cuda" for nccl).
    disk_dir: where the disk path writes checkpoints (one per version; older removed).
    base_model_dir: HF model directory whose config/tokenizer files go with them.
    timeout_s: both sides of the group rendezvous and each update request.
    """

    mode: Literal["distributed", "disk", "tensor"] = "distributed"
    backend: str = "nccl"
    master_address: str = "127.0.0.1"
    master_port: int | None = None
    group_name: str = "weight_update_group"
    device: str = "cuda"
    disk_dir: str | None = None
    base_model_dir: str | None = None
    timeout_s: float = 600.0
    # FP8 rollout: servers started from a block-wise FP8 checkpoint; every linear weight
    # is sent as e4m3 plus its fp32 `<name>_scale_inv` [ceil(out/128), ceil(in/128)]
    fp8: bool = False


@dataclass
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


def _finish_reason(meta: dict[str, Any]) -> str:
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind in ("stop", "length", "abort"):
        return str(kind)
    raise RolloutError(f"unexpected finish_reason {fr!r} in SGLang reply")


def parse_generate_reply(reply: Any, prompt_index: int, sample_index: int, prompt: list[int],
                         default_version: int) -> Sample:  # fmt: skip
    """A Sample from one SGLang /generate answer ({"output_ids", "meta_info"})."""
    if isinstance(reply, list):
        if len(reply) != 1:
            raise RolloutError(f"expected one generation per request, got {len(reply)}")
        reply = reply[0]
    if not isinstance(reply, dict) or "meta_info" not in reply:
        raise RolloutError(f"malformed SGLang /generate reply: {str(reply)[:300]}")
    meta = reply["meta_info"]
    triples = meta.get("output_token_logprobs") or []
    ids = reply.get("output_ids")
    if ids is None:
        ids = [int(t[1]) for t in triples]
    ids = [int(t) for t in ids]
    if len(triples) != len(ids):
        raise RolloutError(
            f"SGLang reply for sample ({prompt_index}, {sample_index}) has {len(ids)} output ids "
            f"but {len(triples)} logprobs (was return_logprob honoured?)"
        )
    for t, (tok, triple) in enumerate(zip(ids, triples)):
        if int(triple[1]) != tok:
            raise RolloutError(
                f"SGLang reply for sample ({prompt_index}, {sample_index}): logprob {t} is for "
                f"token {triple[1]}, output id is {tok}"
            )
    version = meta.get("weight_version")
    try:
        version = int(version) if version is not None else default_version
    except (TypeError, ValueError):
        version = default_version
    return Sample(prompt_index, sample_index, list(prompt), ids,
                  [float(t[0]) for t in triples], _finish_reason(meta), version,
                  request_id=str(meta.get("id", "")))  # type: ignore[arg-type]  # fmt: skip


def generate_payload(prompt: Sequence[int], params: SamplingParams, rid: str) -> dict[str, Any]:
    """The JSON body of POST /generate for one sample."""
    sp: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "ignore_eos": params.ignore_eos,
    }
    if params.stop_token_ids:
        sp["stop_token_ids"] = list(params.stop_token_ids)
    # params.seed is not sent: per-request seeds are not in every 0.5.x server.
    return {
        "input_ids": [int(t) for t in prompt],
        "sampling_params": sp,
        "rid": rid,
        "return_logprob": True,
        "logprob_start_len": -1,
        "stream": False,
    }


class SGLangEngine:
    """RolloutEngine over running SGLang servers. Use `SGLangEngine.launch` to start
    servers (and a router) as child processes, or pass the URLs of running ones."""

    def __init__(
        self,
        servers: Sequence[ServerHandle | str],
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
        self.servers = [s if isinstance(s, ServerHandle) else ServerHandle(s) for s in servers]
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
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-engine",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        self._client: AsyncJsonClient = self._run(self._make_client())
        self._closed = False
        if check_servers:
            try:
                self._run(self._check_servers())
            except BaseException:
                self.shutdown()
                raise

    async def _check_servers(self) -> None:
        """Version, DP size and TP size of every server (GET /server_info; SGLang 0.5.23
        `entrypoints/http_server.py` also serves it as the deprecated /get_server_info)."""
        for s in self.servers:
            try:
                info = await self._client.request("GET", s.url + "/server_info",
                                                  timeout_s=self.health_probe_timeout_s)  # fmt: skip
            except RequestFailed as e:
                if e.status != 404:
                    raise RolloutError(f"SGLang server {s.url}: GET /server_info failed: {e}") from e
                info = await self._client.request("GET", s.url + "/get_server_info",
                                                  timeout_s=self.health_probe_timeout_s)  # fmt: skip
            if not isinstance(info, dict):
                raise RolloutError(f"SGLang server {s.url}: malformed /server_info {str(info)[:200]}")
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
                got = info.get(fld)
                same = (abs(float(got) - float(want)) < 1e-9 if isinstance(want, float)
                        and got is not None else got == want)  # fmt: skip
                if not same:
                    raise RolloutError(
                        f"SGLang server {s.url} runs {fld} = {got!r} but {key} = {want!r}; "
                        "start the servers with the configured value"
                    )
            self.server_info[s.url] = info

    # -- construction from launch args ------------------------------------------------
    @classmethod
    def launch(
        cls,
        server_args: Sequence[SGLangServerArgs],
        log_dir: str | Path,
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
                p = ManagedProcess(build_server_command(a, server_launch), server_env(a),
                                   log_dir / f"sglang_server_{k}_{a.port}.log")  # fmt: skip
                p.start()
                handles.append(ServerHandle(a.url, a.tp_size, p, num_gpus_from_config=True))
            for h in handles:
                wait_healthy(h.url, health_deadline_s, h.process)
            router_url = None
            if router is not None:
                ra = router if isinstance(router, RouterArgs) else RouterArgs(
                    tuple(h.url for h in handles), port=free_port())  # fmt: skip
                router_proc = ManagedProcess(build_router_command(ra, router_launch), None,
                                             log_dir / f"sglang_router_{ra.port}.log")  # fmt: skip
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
        return cls(handles, router_url=router_url, router_process=router_proc,
                   health_deadline_s=health_deadline_s, **kwargs)  # fmt: skip

    # -- loop plumbing ----------------------------------------------------------------
    async def _make_client(self) -> AsyncJsonClient:
        return AsyncJsonClient(self.client_cfg)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

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
            asyncio.create_task(self._one_sample(step, i, j, prompts[i], params, results))
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

    def _pick_target(self) -> tuple[str, ServerHandle | None]:
        if self.router_url is not None:
            return self.router_url, None
        live = [s for s in self.servers if s.usable]
        if not live:
            detail = "; ".join(f"{s.url}: {s.last_error or ('stale weights' if s.stale else 'down')}"
                               for s in self.servers)  # fmt: skip
            raise RolloutError(
                f"no live SGLang server left ({len(self.servers)} configured): {detail}"
            )
        server = live[next(self._rr) % len(live)]
        return server.url, server

    async def _one_sample(self, step: str, i: int, j: int, prompt: list[int],
                          params: SamplingParams, results: dict[tuple[int, int], Sample]) -> None:  # fmt: skip
        last_error = ""
        for attempt in range(self.client_cfg.max_retries + 1):
            if attempt > 0 and self._paused.is_set():
                # paused mid-step: the slot ends as aborted instead of being retried
                results[(i, j)] = Sample(i, j, prompt, [], [], "abort", self._version)
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
            sample = parse_generate_reply(reply, i, j, prompt, self._version)
            if (i, j) in results:  # cannot happen: one task per slot; guard the invariant
                raise RolloutError(f"sample ({i}, {j}) answered twice")
            sample.request_id = rid
            results[(i, j)] = sample
            return
        raise RolloutError(
            f"sample (prompt {i}, sample {j}) failed after {self.client_cfg.max_retries + 1} "
            f"attempts; last error: {last_error}"
        )

    async def _abort_rid(self, server: ServerHandle | None, rid: str) -> None:
        """Abort one request on the worker that has it; through a router (which has no
        /abort_request in sglang-router 0.3.2) the worker is unknown, so every live worker
        gets the abort (an unknown rid is a no-op there). Best effort, short timeout."""
        targets = [server] if server is not None else [s for s in self.servers if not s.dead]
        for s in targets:
            with contextlib.suppress(RequestFailed):
                await self._client.request_once("POST", s.url + "/abort_request",
                                                json={"rid": rid}, timeout_s=10.0)  # fmt: skip

    async def _check_workers(self, error: str) -> None:
        """After a failed routed request: probe every live worker (concurrently) and mark
        those that do not answer dead (and out of the router)."""
        live = [s for s in self.servers if not s.dead]
        await asyncio.gather(*(self._on_server_failure(s, f"routed request failed: {error}")
                               for s in live))  # fmt: skip

    def _dead_summary(self) -> str:
        dead = [f"{s.url} ({s.last_error[:200]})" for s in self.servers if s.dead]
        return f"; SGLang servers down: {', '.join(dead)}" if dead else ""

    async def _probe(self, server: ServerHandle) -> bool:
        if server.process is not None and not server.process.alive:
            return False
        try:
            await self._client.request_once("GET", server.url + server.probe_path,
                                            timeout_s=self.health_probe_timeout_s)  # fmt: skip
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
        log.warning("SGLang server %s is down (%s); %d live server(s) left", server.url,
                    error[:300], live)  # fmt: skip
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
            await asyncio.to_thread(wait_healthy, server.url, self.health_deadline_s, proc,
                                    server.health_path)  # fmt: skip
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
                        "DELETE", f"{self.router_url}/workers/{w['id']}",
                        timeout_s=self.health_probe_timeout_s,
                    )  # fmt: skip
        except RequestFailed as e:
            server.last_error += f"; router removal failed: {e}"

    async def _router_add(self, server: ServerHandle) -> None:
        if self.router_url is None:
            return
        try:
            await self._client.request_once("POST", self.router_url + "/workers",
                                            json={"url": server.url},
                                            timeout_s=self.health_probe_timeout_s)  # fmt: skip
        except RequestFailed as e:
            server.last_error = f"router re-admission failed: {e}"

    async def _check_processes(self) -> None:
        """Notice launched servers whose process has exited (cheap: no HTTP)."""
        for s in self.servers:
            if s.process is not None and not s.dead and not s.process.alive:
                await self._on_server_failure(s, f"process exited with code {s.process.returncode}")

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

    async def _memory(self, path: str, tags: list[str]) -> None:
        """Release or resume GPU memory of every live server (colocated mode,
        --enable-memory-saver; on CPU SGLang 0.5.23 answers 200 and does nothing)."""
        self.session_log.append(f"{path.strip('/')}:{'+'.join(tags)}")
        await self._fanout("POST", path, {"tags": tags}, quiet=False,
                           timeout_s=self.sync_cfg.timeout_s)  # fmt: skip
        if path == "/release_memory_occupation":
            self._released |= set(tags)
        else:
            self._released -= set(tags)

    async def _abort_all(self, quiet: bool) -> None:
        await self._fanout("POST", "/abort_request", {"abort_all": True}, quiet=quiet)

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

    async def _fanout(self, method: str, path: str, body: dict[str, Any] | None,
                      quiet: bool, servers: Sequence[ServerHandle] | None = None,
                      timeout_s: float | None = None) -> list[Any]:  # fmt: skip
        targets = [s for s in (servers if servers is not None else self.servers) if not s.dead]
        replies = await asyncio.gather(
            *(self._client.request(method, s.url + path, json=body, timeout_s=timeout_s, retries=0)
              for s in targets),
            return_exceptions=True,
        )  # fmt: skip
        for s, r in zip(targets, replies):
            if isinstance(r, BaseException) and not quiet:
                raise RolloutError(f"{method} {s.url}{path} failed: {r}") from r
        return list(replies)

    def health(self) -> EngineHealth:
        return self._run(self._health())

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
                await self._client.request_once("GET", self.router_url + "/health",
                                                timeout_s=self.health_probe_timeout_s)  # fmt: skip
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

    # -- weights ----------------------------------------------------------------------
    def update_weights(
        self, buckets: Iterable[NamedTensorBucket], version: int | None = None
    ) -> None:
        new_version = self._version + 1 if version is None else int(version)
        mode = self.sync_cfg.mode
        if mode not in ("distributed", "disk", "tensor"):
            raise ValueError(f"unknown weight sync mode {mode!r}")
        if self.sync_cfg.fp8:
            from archer_mcore.rollout.fp8_export import quantize_buckets

            buckets = quantize_buckets(buckets, scheme="block")
        self._run(self._check_alive())
        self._syncing = True
        try:
            if "weights" in self._released:  # colocated: weights back before loading
                self._run(self._memory("/resume_memory_occupation", ["weights"]))
            if mode == "disk":
                self._run(self._update_disk(buckets, new_version))
            else:
                self._run(self._update_in_session(buckets, new_version))
        finally:
            self._syncing = False
        self._version = new_version
        refreshed = [s for s in self.servers if s.stale and not s.dead]
        for s in refreshed:
            s.stale = False
        self._run(self._readmit(refreshed))

    async def _check_alive(self) -> None:
        """Before a sync: a server that does not answer GET /model_info at all (its process
        gone, connection refused or no answer within the probe timeout) is marked down and
        left out of the sync; the router may have hidden its death from generation.
        /model_info is answered by the tokenizer manager without the model lock, unlike
        /health, so a busy server is not misjudged."""
        await self._check_processes()
        live = [s for s in self.servers if not s.dead]
        out = await asyncio.gather(
            *(self._client.request_once("GET", s.url + "/model_info",
                                        timeout_s=self.health_probe_timeout_s) for s in live),
            return_exceptions=True,
        )  # fmt: skip
        for s, r in zip(live, out):
            if isinstance(r, RequestFailed) and r.transport:
                await self._mark_dead(s, f"not answering before the weight sync: {r}")
        if not any(not s.dead for s in self.servers):
            raise RolloutError(f"no live SGLang server left for the weight sync{self._dead_summary()}")

    async def _readmit(self, servers: Sequence[ServerHandle]) -> None:
        for s in servers:
            await self._router_add(s)

    async def _post_all(self, servers: Sequence[ServerHandle], path: str, body: dict[str, Any],
                        what: str) -> None:  # fmt: skip
        """POST to every server at once; RolloutError naming each one that failed (HTTP
        error or {"success": false})."""
        out = await asyncio.gather(
            *(self._client.request("POST", s.url + path, json=body,
                                   timeout_s=self.sync_cfg.timeout_s, retries=0)
              for s in servers),
            return_exceptions=True,
        )  # fmt: skip
        errors = [f"{s.url}: {r}" for s, r in zip(servers, out) if _failed(r)]
        if errors:
            raise RolloutError(f"{what} failed: {errors}")

    async def _init_group(self) -> None:
        """(Re)build the weight-update group. Every member first destroys a group of that
        name (SGLang refuses to re-create one that exists, and the trainer would then
        block in rendezvous); both sides time out after sync_cfg.timeout_s."""
        cfg = self.sync_cfg
        members = [s for s in self.servers if not s.dead]
        if self._pg is not None:
            destroy_weight_update_group(self._pg)
            self._pg = None
        # "does not exist" answers are expected here: only the state after matters
        await self._fanout("POST", "/destroy_weights_update_group",
                           {"group_name": cfg.group_name}, quiet=True, servers=members,
                           timeout_s=cfg.timeout_s)  # fmt: skip
        port = cfg.master_port or free_port(
            "0.0.0.0" if cfg.master_address not in ("127.0.0.1", "localhost") else "127.0.0.1"
        )
        world, offsets = rank_layout([s.num_gpus for s in members])
        requests = [
            self._client.request("POST", s.url + "/init_weights_update_group", json={
                "master_address": cfg.master_address, "master_port": port,
                "rank_offset": off, "world_size": world,
                "group_name": cfg.group_name, "backend": cfg.backend,
            }, timeout_s=cfg.timeout_s, retries=0)
            for s, off in zip(members, offsets)
        ]  # fmt: skip
        join = asyncio.to_thread(init_weight_update_group, cfg.backend, cfg.master_address, port,
                                 0, world, cfg.group_name, cfg.timeout_s)  # fmt: skip
        out = await asyncio.gather(join, *requests, return_exceptions=True)
        errors = [f"{s.url}: {r}" for s, r in zip(members, out[1:]) if _failed(r)]
        if isinstance(out[0], BaseException) or errors:
            if not isinstance(out[0], BaseException):
                destroy_weight_update_group(out[0])
            raise RolloutError(
                f"init_weights_update_group failed (world {world}, {cfg.master_address}:{port}): "
                f"trainer: {out[0] if isinstance(out[0], BaseException) else 'ok'}; servers: {errors}"
            )
        self._pg = out[0]
        self._group_members = members
        self._pg_invalid = False

    async def _update_in_session(self, buckets: Iterable[NamedTensorBucket], version: int) -> None:
        """Distributed or tensor update inside one begin/end weight-update session on
        every live server. end_weight_update is sent even after a failure (a session left
        open makes the next begin fail)."""
        if self.sync_cfg.mode == "distributed" and (
            self._pg is None or self._pg_invalid or any(s.dead for s in self._group_members)
        ):
            await self._init_group()
        members = (self._group_members if self.sync_cfg.mode == "distributed"
                   else [s for s in self.servers if not s.dead])  # fmt: skip
        self.session_log.append("begin")
        await self._post_all(members, "/begin_weight_update", {}, "begin_weight_update")
        try:
            if self.sync_cfg.mode == "distributed":
                await self._send_distributed(members, buckets, version)
            else:
                await self._send_tensors(members, buckets, version)
        finally:
            self.session_log.append("end")
            await self._post_all(members, "/end_weight_update", {}, "end_weight_update")

    async def _send_distributed(self, members: Sequence[ServerHandle],
                                buckets: Iterable[NamedTensorBucket], version: int) -> None:  # fmt: skip
        import torch

        cfg = self.sync_cfg
        device = torch.device(cfg.device)
        for bucket, last in with_last_flag(buckets):
            names, dtypes, shapes = bucket_metadata(bucket)
            body = {"names": names, "dtypes": dtypes, "shapes": shapes,
                    "group_name": cfg.group_name, "flush_cache": last,
                    "weight_version": str(version)}  # fmt: skip
            self.session_log.append("update_weights_from_distributed")
            requests = [
                self._client.request("POST", s.url + "/update_weights_from_distributed", json=body,
                                     timeout_s=cfg.timeout_s, retries=0)
                for s in members
            ]  # fmt: skip
            bcast = asyncio.to_thread(broadcast_bucket, self._pg, bucket, device)
            out = await asyncio.gather(bcast, *requests, return_exceptions=True)
            errors = [f"{s.url}: {r}" for s, r in zip(members, out[1:]) if _failed(r)]
            if isinstance(out[0], BaseException) or errors:
                self._pg_invalid = True
                raise RolloutError(
                    f"update_weights_from_distributed failed for bucket {names[:3]}...: "
                    f"broadcast: {out[0] if isinstance(out[0], BaseException) else 'ok'}; "
                    f"servers: {errors}"
                )

    async def _send_tensors(self, members: Sequence[ServerHandle],
                            buckets: Iterable[NamedTensorBucket], version: int) -> None:  # fmt: skip
        """Colocated: one /update_weights_from_tensor per bucket and server, the tensors
        passed by shared memory (same host only)."""
        for bucket, last in with_last_flag(buckets):
            for s in members:
                payload = serialize_named_tensors(bucket)
                body = {"serialized_named_tensors": [payload] * s.num_gpus,
                        "flush_cache": last, "weight_version": str(version)}  # fmt: skip
                self.session_log.append("update_weights_from_tensor")
                reply = await self._client.request(
                    "POST", s.url + "/update_weights_from_tensor", json=body,
                    timeout_s=self.sync_cfg.timeout_s, retries=0,
                )  # fmt: skip
                if _failed(reply):
                    raise RolloutError(f"{s.url} refused update_weights_from_tensor: {reply}")

    async def _update_disk(self, buckets: Iterable[NamedTensorBucket], version: int) -> None:
        cfg = self.sync_cfg
        if cfg.disk_dir is None:
            raise RolloutError("weight sync mode 'disk' needs WeightSyncConfig.disk_dir")
        root = Path(cfg.disk_dir)
        out = root / f"weights_v{version}"
        base = Path(cfg.base_model_dir) if cfg.base_model_dir else None
        await asyncio.to_thread(write_hf_checkpoint, buckets, out, base, replace=True)
        live = [s for s in self.servers if not s.dead]
        results = await asyncio.gather(*(self._load_from_disk(s, out, version) for s in live),
                                       return_exceptions=True)  # fmt: skip
        errors = [f"{s.url}: {r}" for s, r in zip(live, results) if isinstance(r, BaseException)]
        if errors:
            raise RolloutError(f"update_weights_from_disk({out}) failed: {errors}")
        previous, self._last_checkpoint = self._last_checkpoint, out
        if previous is not None and previous != out:
            shutil.rmtree(previous, ignore_errors=True)

    async def _load_from_disk(self, server: ServerHandle, path: Path, version: int) -> None:
        # load_format "auto": the request's default is the server's own, and a server
        # started with --load-format dummy would then "load" random weights again
        reply = await self._client.request(
            "POST", server.url + "/update_weights_from_disk",
            json={"model_path": str(path), "load_format": "auto", "weight_version": str(version)},
            timeout_s=self.sync_cfg.timeout_s, retries=0,
        )  # fmt: skip
        if _failed(reply):
            raise RolloutError(f"{server.url} refused weights from {path}: {reply}")


def rank_layout(tp_sizes: Sequence[int]) -> tuple[int, list[int]]:
    """(world_size, rank_offset of each server) of the weight-update group: the trainer
    is rank 0 and SGLang places TP worker k of a server at rank_offset + k (0.5.23
    `model_executor/model_runner_components/weight_updater.py`: rank = rank_offset +
    tp_rank), so each server's offset counts the TP workers of the servers before it."""
    if any(int(tp) < 1 for tp in tp_sizes):
        raise ValueError(f"TP sizes must be >= 1, got {list(tp_sizes)}")
    offsets = list(itertools.accumulate([1, *map(int, tp_sizes)]))
    return offsets[-1], offsets[:-1]


def serialize_named_tensors(bucket: NamedTensorBucket) -> str:
    """One TP rank's payload of /update_weights_from_tensor: the list of (name, tensor)
    pickled with torch's ForkingPickler (tensors travel as shared-memory handles) and
    base64-encoded, the encoding SGLang 0.5.23 `utils/common.py`
    MultiprocessingSerializer.deserialize reads. Uses the "file_system" sharing
    strategy (the default file-descriptor one failed to unpickle in the server)."""
    import base64
    import io
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing as tmp

    tmp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump([(name, t.detach().contiguous()) for name, t in bucket])
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _failed(reply: Any) -> bool:
    """An exception, or an SGLang {"success": false, ...} answer."""
    if isinstance(reply, BaseException):
        return True
    return isinstance(reply, dict) and reply.get("success") is False
