"""A stand-in SGLang server for boundary tests.

It checks every request against SGLang's documented HTTP API (method, path, JSON field
names and types; see /work/shared/SGLANG_API.md) and answers in SGLang's response
format. Violations are recorded, never silently accepted; tests assert there are none.
Its "model" emits deterministic pseudo-random tokens per request id.

Where it mimics SGLang's behaviour beyond the request format, it follows SGLang 0.5.23
(the version setup.py pins; the real server itself is tested in tests/sglang_real/):
* GET /server_info answers version "0.5.23" and the launch flags tp_size, dp_size, dtype,
  mem_fraction_static (`sglang/srt/entrypoints/http_server.py` server_info: the resolved
  server args plus "version").
* /update_weights_from_distributed outside a begin/end session answers 400
  {"success": false} ("must run between begin_weight_update() and end_weight_update()");
  /begin_weight_update while a session is open and /end_weight_update without one answer
  400 (`sglang/srt/managers/scheduler_components/weight_updater.py`; status codes from
  `http_server.py`).
* /init_weights_update_group for a group name that exists fails, and
  /destroy_weights_update_group of a group that does not exist answers
  {"success": false, "message": "The group to be destroyed does not exist."}
  (`sglang/srt/model_executor/model_runner_components/weight_updater.py`; SGLang's
  handler would re-create the process group and fail in its rendezvous).
* /update_weights_from_disk uses the request's load_format, and with none the server's
  own (`--load-format`): a server started with "dummy" then reloads random weights,
  modelled here as a failure (`managers/io_struct.py` UpdateWeightFromDiskReqInput,
  `model_runner_components/weight_updater.py` update_weights_from_disk).
* GET /health and /health_generate wait while a weight update runs (they generate a
  token through the scheduler, which holds the model-update lock).
* /abort_request exists on workers only (sglang-router 0.3.2 answers 404).
* With --tp-size T > 1 (process mode) TP worker k joins the weight-update group at rank
  `rank_offset + k` (`model_runner_components/weight_updater.py`
  init_weights_update_group: `rank = rank_offset + self.tp_rank`) and every worker
  receives every broadcast; workers 1..T-1 are child processes (`--fake-tp-worker`).

Runs in a thread (`FakeSGLangServer(...).start()`) or as a process that takes
`sglang.launch_server`'s flags (`python fake_sglang.py --model-path ... --port N ...`)
plus test-only flags (--fake-die-after K: exit the process instead of sending its
answer K+1). As a process it can join the weight-update group (torch
imported lazily), receiving broadcasts as SGLang does, and reports everything it saw at
GET /_test/state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NUM = (int, float)
# path -> (method, required fields, optional fields); values: type or tuple of types
SCHEMA: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "/generate": ("POST", {"input_ids": list, "sampling_params": dict, "rid": str,
                           "return_logprob": bool},
                  {"logprob_start_len": int, "stream": bool, "top_logprobs_num": int,
                   # GenerateReqInput fields sglang-router 0.3.x fills in with defaults:
                   "model": (str, type(None)), "return_text_in_logprobs": bool,
                   "log_metrics": bool, "return_hidden_states": bool, "background": bool,
                   "no_logs": bool, "return_bytes": bool, "return_entropy": bool}),
    "/init_weights_update_group": ("POST", {"master_address": str, "master_port": int,
                                            "rank_offset": int, "world_size": int,
                                            "group_name": str, "backend": str}, {}),
    "/update_weights_from_distributed": ("POST", {"names": list, "dtypes": list, "shapes": list},
                                         {"group_name": str, "flush_cache": bool,
                                          "abort_all_requests": bool, "weight_version": str,
                                          "load_format": (str, type(None))}),
    "/destroy_weights_update_group": ("POST", {"group_name": str}, {}),
    "/begin_weight_update": ("POST", {}, {"selector": str}),
    "/end_weight_update": ("POST", {}, {}),
    "/update_weights_from_disk": ("POST", {"model_path": str},
                                  {"load_format": (str, type(None)), "abort_all_requests": bool,
                                   "weight_version": str}),
    "/pause_generation": ("POST", {}, {"mode": str}),
    "/continue_generation": ("POST", {}, {}),
    "/abort_request": ("POST", {}, {"rid": str, "abort_all": bool}),
}  # fmt: skip
SAMPLING_FIELDS: dict[str, Any] = {
    "max_new_tokens": int, "temperature": NUM, "top_p": NUM, "top_k": int,
    "stop_token_ids": list, "ignore_eos": bool, "min_p": NUM, "n": int,
}  # fmt: skip
GET_PATHS = ("/health", "/health_generate", "/get_model_info", "/model_info", "/server_info",
             "/get_server_info", "/_test/state")  # fmt: skip
DTYPES = ("float32", "float16", "bfloat16", "float64")


def _type_ok(value: Any, t: Any) -> bool:
    if t is int or t == (int,):
        return isinstance(value, int) and not isinstance(value, bool)
    if t is NUM:
        return isinstance(value, NUM) and not isinstance(value, bool)
    return isinstance(value, t)


def check_request(method: str, path: str, body: Any) -> list[str]:
    """Violations of the documented API by one request (empty list: conforms)."""
    if path not in SCHEMA:
        return [f"{method} {path}: unknown endpoint"]
    want_method, required, optional = SCHEMA[path]
    errs: list[str] = []
    if method != want_method:
        errs.append(f"{path}: method {method}, expected {want_method}")
    if not isinstance(body, dict):
        return [*errs, f"{path}: body is not a JSON object"]
    for k, t in required.items():
        if k not in body:
            errs.append(f"{path}: missing field {k!r}")
        elif not _type_ok(body[k], t):
            errs.append(f"{path}: field {k!r} has type {type(body[k]).__name__}")
    for k, v in body.items():
        if k not in required and k not in optional:
            errs.append(f"{path}: unknown field {k!r}")
        elif k in optional and not _type_ok(v, optional[k]):
            errs.append(f"{path}: field {k!r} has type {type(v).__name__}")
    if path == "/generate":
        errs += _check_generate(body)
    if path == "/update_weights_from_distributed":
        n = len(body.get("names", []))
        if not (len(body.get("dtypes", [])) == n == len(body.get("shapes", []))):
            errs.append("update_weights_from_distributed: names/dtypes/shapes lengths differ")
        errs += [f"unknown dtype {d!r}" for d in body.get("dtypes", []) if d not in DTYPES]
    if path == "/pause_generation" and body.get("mode", "abort") not in (
        "abort",
        "retract",
        "in_place",
    ):
        errs.append(f"pause_generation: bad mode {body.get('mode')!r}")
    if path == "/abort_request" and "rid" not in body and not body.get("abort_all"):
        errs.append("abort_request: needs rid or abort_all")
    return errs


def _check_generate(body: dict[str, Any]) -> list[str]:
    errs = []
    ids = body.get("input_ids")
    if not (isinstance(ids, list) and ids and all(_type_ok(t, int) for t in ids)):
        errs.append("generate: input_ids must be a non-empty list of ints (one prompt)")
    if body.get("return_logprob") is not True:
        errs.append("generate: return_logprob must be true for RL")
    if body.get("logprob_start_len", -1) != -1:
        errs.append("generate: logprob_start_len should be -1 (output tokens only)")
    sp = body.get("sampling_params", {})
    for k, v in sp.items() if isinstance(sp, dict) else ():
        if k not in SAMPLING_FIELDS:
            errs.append(f"generate: unknown sampling param {k!r}")
        elif not _type_ok(v, SAMPLING_FIELDS[k]):
            errs.append(f"generate: sampling param {k!r} has type {type(v).__name__}")
    if isinstance(sp, dict) and "max_new_tokens" not in sp:
        errs.append("generate: sampling_params.max_new_tokens missing")
    return errs


def fake_generation(rid: str, prompt: list[int], sp: dict[str, Any], vocab: int):
    """Deterministic (tokens, logprobs, finish_reason dict) for one request."""
    rng = random.Random(f"{rid}|{prompt}")
    stops = set(sp.get("stop_token_ids") or [])
    tokens: list[int] = []
    logprobs: list[float] = []
    for _ in range(int(sp["max_new_tokens"])):
        tok = rng.randrange(vocab)
        tokens.append(tok)
        logprobs.append(-round(rng.uniform(0.01, 4.0), 6))
        if tok in stops:
            return tokens, logprobs, {"type": "stop", "matched": tok}
    return tokens, logprobs, {"type": "length", "length": len(tokens)}


class _Flag:
    """A flag whose clearing can be waited for (threading.Event waits for setting)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._set = False

    def set(self) -> None:
        with self._cond:
            self._set = True

    def clear(self) -> None:
        with self._cond:
            self._set = False
            self._cond.notify_all()

    def wait_clear(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._set, timeout)


class FakeSGLangServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, vocab: int = 64,
                 token_delay_s: float = 0.0, die_after: int | None = None,
                 hang_after: int | None = None, exit_process_on_die: bool = False,
                 fail_first: int = 0, fail_status: int = 503,
                 model_path: str = "fake-model", argv: list[str] | None = None,
                 version: str = "0.5.23", tp_size: int = 1, dp_size: int = 1,
                 load_format: str = "auto", dtype: str = "bfloat16",
                 mem_fraction_static: float = 0.8, api_key: str | None = None) -> None:  # fmt: skip
        self.api_key = api_key  # as SGLang's --api-key: Bearer required but on /health*
        self.unauthorized: list[str] = []  # paths refused for a missing or wrong key
        self.dtype = dtype
        self.mem_fraction_static = mem_fraction_static
        self.version = version
        self.tp_size = tp_size
        self.dp_size = dp_size
        self.load_format = load_format  # the server's --load-format
        self.session_open = False
        self.updating = _Flag()
        self.tp_workers: list[_TPWorker] = []
        self.tp_sums: dict[str, list[float]] = {}  # name -> float64 sum seen by workers 1..
        self.vocab = vocab
        self.token_delay_s = token_delay_s
        self.die_after = die_after
        self.hang_after = hang_after
        self.exit_process_on_die = exit_process_on_die
        self.fail_first = fail_first  # answer the first K generate requests with fail_status
        self.fail_status = fail_status
        self.in_flight = 0
        self.max_in_flight = 0
        self.model_path = model_path
        self.argv = argv or []
        self.lock = threading.Lock()
        self.reply_lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.served: dict[str, dict[str, Any]] = {}  # rid -> what was answered
        self.started: list[str] = []  # rids received
        self.aborted: set[str] = set()
        self.abort_all_epoch = 0
        self.paused = False
        self.dead = threading.Event()
        self.received: dict[str, Any] = {}  # name -> torch tensor (weights received)
        self.flushes = 0
        self.weight_version = "0"
        self.pg: Any = None
        self.conns: set[socket.socket] = set()
        self.httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeSGLangServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.dead.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._drop_connections()

    def die(self) -> None:
        """Simulate a crash: stop listening and cut every open connection."""
        if self.exit_process_on_die:
            os._exit(3)
        self.dead.set()
        threading.Thread(target=self.httpd.shutdown, daemon=True).start()
        self.httpd.socket.close()
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def state(self) -> dict[str, Any]:
        with self.lock:
            return {
                "argv": self.argv,
                "unauthorized": list(self.unauthorized),
                "requests": list(self.requests),
                "violations": list(self.violations),
                "served": dict(self.served),
                "started": list(self.started),
                "flushes": self.flushes,
                "weight_version": self.weight_version,
                "tp_sums": dict(self.tp_sums),
                "received": {k: {"dtype": str(v.dtype).removeprefix("torch."),
                                 "shape": list(v.shape),
                                 "values": v.double().flatten().tolist()}
                             for k, v in self.received.items()},
            }  # fmt: skip

    # -- request handling --------------------------------------------------------------
    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.conns.add(self.connection)

            def finish(self) -> None:
                with server.lock:
                    server.conns.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def _reply(self, code: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def _refused(self, path: str) -> bool:
                """SGLang 0.5.23 `utils/auth.py`: with --api-key every endpoint but
                /health*, /ready* and /metrics needs `Authorization: Bearer <key>`."""
                if server.api_key is None or path.startswith(("/health", "/_test/")):
                    return False
                if self.headers.get("Authorization") == f"Bearer {server.api_key}":
                    return False
                with server.lock:
                    server.unauthorized.append(path)
                self._reply(401, {"error": "Unauthorized"})
                return True

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if self._refused(path):
                    return None
                if path not in GET_PATHS:
                    with server.lock:
                        server.violations.append(f"GET {path}: unknown endpoint")
                    return self._reply(404, {"error": "not found"})
                if path == "/_test/state":
                    return self._reply(200, server.state())
                with server.lock:
                    server.requests.append({"method": "GET", "path": path, "body": None})
                    hung = server.hang_after is not None and len(server.started) > server.hang_after
                if path == "/health_generate" and hung:
                    server.dead.wait(60)  # a hung server cannot generate its health token
                    return None
                if path in ("/get_model_info", "/model_info"):
                    return self._reply(200, {"model_path": server.model_path,
                                             "tokenizer_path": None, "is_generation": True,
                                             "weight_version": server.weight_version})  # fmt: skip
                if path in ("/server_info", "/get_server_info"):
                    return self._reply(200, {"model_path": server.model_path,
                                             "tp_size": server.tp_size,
                                             "dp_size": server.dp_size,
                                             "dtype": server.dtype,
                                             "mem_fraction_static": server.mem_fraction_static,
                                             "version": server.version})  # fmt: skip
                if path in ("/health", "/health_generate"):
                    server.updating.wait_clear(60)
                return self._reply(200, {})

            def do_POST(self) -> None:
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self._refused(path):
                    return None
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    body = None
                errs = check_request("POST", path, body)
                with server.lock:
                    server.requests.append({"method": "POST", "path": path, "body": body})
                    server.violations.extend(errs)
                if errs:
                    return self._reply(400, {"error": "; ".join(errs)})
                handler = getattr(server, "_post_" + path.strip("/"))
                code, obj = handler(body, self)
                if code is not None:
                    self._reply(code, obj)

        return Handler

    def _post_generate(self, body: dict[str, Any], h: BaseHTTPRequestHandler):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return self._generate(body, h)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _generate(self, body: dict[str, Any], h: BaseHTTPRequestHandler):
        rid = body["rid"]
        with self.lock:
            self.started.append(rid)
            epoch = self.abort_all_epoch
            fail = len(self.started) <= self.fail_first
        if fail:
            return self.fail_status, {"error": {"message": "injected failure"}}
        if self.hang_after is not None and len(self.started) > self.hang_after:
            self.dead.wait(60)  # stops answering (until the server is stopped)
            return None, None
        tokens, logprobs, finish = fake_generation(rid, body["input_ids"], body["sampling_params"],
                                                   self.vocab)  # fmt: skip
        for t in range(len(tokens)):
            if self.dead.is_set():
                return None, None
            with self.lock:
                stop = rid in self.aborted or self.abort_all_epoch != epoch or self.paused
            if stop:
                tokens, logprobs = tokens[:t], logprobs[:t]
                finish = {"type": "abort", "message": "Abort request"}
                break
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
        reply = {
            "output_ids": tokens,
            "meta_info": {
                "id": rid, "finish_reason": finish, "prompt_tokens": len(body["input_ids"]),
                "completion_tokens": len(tokens), "cached_tokens": 0,
                "weight_version": self.weight_version, "e2e_latency": 0.0,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens)],
            },
        }  # fmt: skip
        # Answers are written under reply_lock, so a crash never cuts one half-sent and
        # `served` holds exactly the answers that reached the client.
        with self.reply_lock:
            with self.lock:
                crash = self.die_after is not None and len(self.served) >= self.die_after
            if crash:  # crash instead of sending answer die_after + 1
                self.die()
            if crash or self.dead.is_set():
                return None, None
            with self.lock:
                self.served[rid] = {"output_ids": tokens, "logprobs": logprobs, "finish": finish}
            h._reply(200, reply)  # type: ignore[attr-defined]
        return None, None

    def _post_abort_request(self, body: dict[str, Any], h: Any):
        with self.lock:
            if body.get("abort_all"):
                self.abort_all_epoch += 1
            if "rid" in body:
                self.aborted.add(body["rid"])
        return 200, {}

    def _post_pause_generation(self, body: dict[str, Any], h: Any):
        with self.lock:
            self.paused = True
        return 200, {"message": "Generation paused successfully."}

    def _post_continue_generation(self, body: dict[str, Any], h: Any):
        with self.lock:
            self.paused = False
        return 200, {"message": "Generation continued successfully."}

    def _post_begin_weight_update(self, body: dict[str, Any], h: Any):
        with self.lock:
            if self.session_open:
                return 400, {"success": False, "message": "a weight-update session is already "
                             "open; call end_weight_update() first"}  # fmt: skip
            self.session_open = True
        return 200, {"success": True, "message": "Success"}

    def _post_end_weight_update(self, body: dict[str, Any], h: Any):
        with self.lock:
            if not self.session_open:
                return 400, {"success": False, "message": "no weight-update session is open; "
                             "call begin_weight_update() first"}  # fmt: skip
            self.session_open = False
        return 200, {"success": True, "message": "Success"}

    def _post_update_weights_from_disk(self, body: dict[str, Any], h: Any):
        from safetensors.torch import load_file

        if (body.get("load_format") or self.load_format) == "dummy":
            return 200, {"success": False, "message": "load_format dummy: random weights "
                         "instead of the checkpoint", "num_paused_requests": 0}  # fmt: skip

        path = Path(body["model_path"])
        index = path / "model.safetensors.index.json"
        if not (path / "config.json").is_file() or not index.is_file():
            return 200, {"success": False, "message": f"no HF checkpoint at {path}",
                         "num_paused_requests": 0}  # fmt: skip
        weight_map = json.loads(index.read_text())["weight_map"]
        loaded: dict[str, Any] = {}
        for fname in sorted(set(weight_map.values())):
            loaded.update(load_file(str(path / fname)))
        if set(loaded) != set(weight_map):
            return 200, {"success": False, "message": "index does not match shards",
                         "num_paused_requests": 0}  # fmt: skip
        with self.lock:
            self.received = loaded
            self.weight_version = body.get("weight_version", self.weight_version)
        return 200, {"success": True, "message": "Succeeded to update model weights.",
                     "num_paused_requests": 0}  # fmt: skip

    def _post_init_weights_update_group(self, body: dict[str, Any], h: Any):
        # Built as SGLang's receiving side does it (init_custom_process_group):
        # TCP rendezvous, store prefixed by the group name, _new_process_group_helper.
        from datetime import timedelta

        from torch.distributed.distributed_c10d import (
            Backend,
            PrefixStore,
            _new_process_group_helper,
            _world,
            rendezvous,
        )

        if self.pg is not None:
            return 200, {"success": False, "message": "Failed to initialize custom process "
                         "group: group exists."}  # fmt: skip
        timeout = timedelta(seconds=60)
        self.tp_workers = [_TPWorker() for _ in range(1, self.tp_size)]
        for k, w in enumerate(self.tp_workers, start=1):  # SGLang: rank_offset + tp_rank
            w.send({**body, "op": "init", "rank": body["rank_offset"] + k})
        url = f"tcp://{body['master_address']}:{body['master_port']}"
        store, rank, world = next(rendezvous(url, body["rank_offset"], body["world_size"],
                                             timeout=timeout))  # fmt: skip
        store.set_timeout(timeout)
        store = PrefixStore(body["group_name"], store)
        pg, _ = _new_process_group_helper(world, rank, [], Backend(body["backend"]), store,
                                          group_name=body["group_name"], timeout=timeout)  # fmt: skip
        _world.pg_group_ranks[pg] = {i: i for i in range(world)}
        self.pg = pg
        for w in self.tp_workers:
            w.reply()
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def _post_update_weights_from_distributed(self, body: dict[str, Any], h: Any):
        import torch
        import torch.distributed as dist

        if not self.session_open:
            return 400, {"success": False, "message": "update_weights_from_distributed must run "
                         "between begin_weight_update() and end_weight_update()"}  # fmt: skip
        if self.pg is None:
            return 400, {"success": False, "message": "weight update group not initialized"}
        self.updating.set()
        for w in self.tp_workers:
            w.send({**body, "op": "recv"})
        try:
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(t, src=0, group=self.pg)
                with self.lock:
                    self.received[name] = t
            for w in self.tp_workers:  # every TP worker got the same tensors
                for name, total in w.reply()["sums"].items():
                    self.tp_sums.setdefault(name, []).append(total)
        finally:
            self.updating.clear()
        with self.lock:
            self.flushes += int(body.get("flush_cache", True))
            self.weight_version = body.get("weight_version", self.weight_version)
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def _post_destroy_weights_update_group(self, body: dict[str, Any], h: Any):
        import torch.distributed as dist

        if self.pg is None:
            return 200, {"success": False, "message": "The group to be destroyed does not exist."}
        dist.destroy_process_group(self.pg)
        self.pg = None
        for w in self.tp_workers:
            assert w.proc.stdin is not None
            w.proc.stdin.close()
            w.proc.wait(10)
        self.tp_workers = []
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}


class _TPWorker:
    """A TP worker k >= 1 of a stand-in server: a child process that joins the
    weight-update group and receives broadcasts (JSON lines on stdin/stdout)."""

    def __init__(self) -> None:
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, __file__, "--fake-tp-worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        return json.loads(self.proc.stdout.readline())


def tp_worker_main() -> None:
    """The child side of _TPWorker."""
    import sys
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    pg = None
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "init":
            timeout = timedelta(seconds=60)
            url = f"tcp://{msg['master_address']}:{msg['master_port']}"
            store, rank, world = next(rendezvous(url, msg["rank"], msg["world_size"],
                                                 timeout=timeout))  # fmt: skip
            store.set_timeout(timeout)
            store = PrefixStore(msg["group_name"], store)
            pg, _ = _new_process_group_helper(world, rank, [], Backend(msg["backend"]), store,
                                              group_name=msg["group_name"], timeout=timeout)  # fmt: skip
            _world.pg_group_ranks[pg] = {i: i for i in range(world)}
            out: dict[str, Any] = {"ok": True, "rank": rank}
        else:
            sums = {}
            for name, dtype, shape in zip(msg["names"], msg["dtypes"], msg["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(t, src=0, group=pg)
                sums[name] = float(t.double().sum())
            out = {"ok": True, "sums": sums}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> None:
    import sys

    if "--fake-tp-worker" in sys.argv:
        return tp_worker_main()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--fake-die-after", type=int, default=None)
    ap.add_argument("--fake-token-delay", type=float, default=0.0)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--dp-size", type=int, default=1)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mem-fraction-static", type=float, default=0.8)
    ap.add_argument("--config", default=None)  # SGLang's YAML flags file: only api-key read
    args, _unknown = ap.parse_known_args()  # the other sglang flags are recorded in argv
    import sys

    srv = FakeSGLangServer(args.host, args.port, die_after=args.fake_die_after,
                           token_delay_s=args.fake_token_delay, exit_process_on_die=True,
                           model_path=args.model_path, argv=sys.argv[1:], tp_size=args.tp_size,
                           dp_size=args.dp_size, load_format=args.load_format, dtype=args.dtype,
                           mem_fraction_static=args.mem_fraction_static,
                           api_key=_config_api_key(args.config))  # fmt: skip
    srv.httpd.serve_forever()


def _config_api_key(path: str | None) -> str | None:
    """The `api-key:` entry of a --config YAML file (None without one)."""
    if path is None:
        return None
    for line in Path(path).read_text().splitlines():
        if line.startswith("api-key:"):
            return line.split(":", 1)[1].strip()
    return None


if __name__ == "__main__":
    main()
