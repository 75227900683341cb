"""The weight-sync client of the SGLang engine: the modes "distributed" (the trainer
broadcasts each bucket over a process group it forms with every server TP worker),
"tensor" (colocated servers receive the tensors through /update_weights_from_tensor,
same host) and "disk" (HF checkpoint + /update_weights_from_disk with load_format
"auto"). Distributed and tensor updates are wrapped in POST /begin_weight_update ...
POST /end_weight_update (SGLang 0.5.23 `managers/scheduler_components/weight_updater.py`
answers 400 otherwise). The trainer's side of the group lives in weight_sync.py.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from archer_mcore.model.hf_io import write_hf_checkpoint
from archer_mcore.rollout.cuda_ipc import uuid_device_reductions
from archer_mcore.rollout.http_client import RequestFailed
from archer_mcore.rollout.sglang_protocol import rank_layout, reply_failed, serialize_named_tensors
from archer_mcore.rollout.sglang_servers import ServerHandle, ServerPool
from archer_mcore.rollout.types import NamedTensorBucket, RolloutError
from archer_mcore.rollout.weight_sync import (
    bind_rendezvous,
    broadcast_bucket,
    bucket_metadata,
    destroy_weight_update_group,
    init_weight_update_group,
    with_last_flag,
)


class WeightSyncClient(ServerPool):
    """update_weights and its three modes (see module doc); state set by SGLangEngine."""

    _pg: Any
    _group_members: list[ServerHandle]

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
        errors = [f"{s.url}: {r}" for s, r in zip(servers, out) if reply_failed(r)]
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
        # the store listens on the advertised address only (port 0: a free one, no race)
        listener = bind_rendezvous(cfg.master_address, cfg.master_port or 0)
        port = int(listener.getsockname()[1])
        world, offsets = rank_layout([s.num_gpus for s in members])
        requests = [
            self._client.request("POST", s.url + "/init_weights_update_group", json={
                "master_address": cfg.master_address, "master_port": port,
                "rank_offset": off, "world_size": world,
                "group_name": cfg.group_name, "backend": cfg.backend,
            }, timeout_s=cfg.timeout_s, retries=0)
            for s, off in zip(members, offsets)
        ]  # fmt: skip
        join = asyncio.to_thread(init_weight_update_group, backend=cfg.backend,
                                 master_address=cfg.master_address, master_port=port, rank=0,
                                 world_size=world, group_name=cfg.group_name,
                                 timeout_s=cfg.timeout_s, listener=listener)  # fmt: skip
        out = await asyncio.gather(join, *requests, return_exceptions=True)
        errors = [f"{s.url}: {r}" for s, r in zip(members, out[1:]) if reply_failed(r)]
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
            errors = [f"{s.url}: {r}" for s, r in zip(members, out[1:]) if reply_failed(r)]
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
        passed by shared memory (same host only; CUDA tensors as IPC handles that name
        their device by UUID, rollout/cuda_ipc.py)."""
        for bucket, last in with_last_flag(buckets):
            for s in members:
                # CUDA tensors travel with their device's UUID, not its index (SGLang
                # 0.5.23's receiver maps it to its own device: cuda_ipc)
                with uuid_device_reductions():
                    payload = serialize_named_tensors(bucket)
                body = {"serialized_named_tensors": [payload] * s.num_gpus,
                        "flush_cache": last, "weight_version": str(version)}  # fmt: skip
                self.session_log.append("update_weights_from_tensor")
                reply = await self._client.request(
                    "POST", s.url + "/update_weights_from_tensor", json=body,
                    timeout_s=self.sync_cfg.timeout_s, retries=0,
                )  # fmt: skip
                if reply_failed(reply):
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
        if reply_failed(reply):
            raise RolloutError(f"{server.url} refused weights from {path}: {reply}")
