"""SGLang's HTTP protocol as the engine speaks it: the supported versions, the body of
POST /generate and the parsing of its answer, the weight-update group's rank layout and
the tensor-sync payload. Pure functions (no I/O); sglang_servers.py, sglang_weights.py
and sglang_engine.py build on them.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from archer_mcore.rollout.types import (
    NamedTensorBucket,
    RolloutError,
    Sample,
    SamplingParams,
)

#: SGLang versions whose weight-update protocol this engine speaks (begin/end sessions
#: appeared in 0.5.21; setup.py's gpu extra pins 0.5.23).
SUPPORTED_SGLANG = ((0, 5, 21), (0, 5, 23))


def parse_version(text: str) -> tuple[int, ...]:
    """The version tuple: "0.5.23" -> (0, 5, 23); suffixes such as "rc1" or "+cu12" are
    ignored."""
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


@dataclass(frozen=True, kw_only=True)
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


def _finish_reason(meta: dict[str, Any]) -> str:
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind in ("stop", "length", "abort"):
        return str(kind)
    raise RolloutError(f"unexpected finish_reason {fr!r} in SGLang reply")


def parse_generate_reply(
    reply: Any, prompt_index: int, sample_index: int, prompt: list[int], *, default_version: int
) -> Sample:
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
    return Sample(
        prompt_index=prompt_index,
        sample_index=sample_index,
        prompt_ids=list(prompt),
        token_ids=ids,
        logprobs=[float(t[0]) for t in triples],
        finish_reason=_finish_reason(meta),  # type: ignore[arg-type]
        weight_version=version,
        request_id=str(meta.get("id", "")),
    )


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


#: /server_info fields that carry secrets (0.5.23 returns the server args, keys included,
#: and `launch_command`, the flags with those of --config merged in: the key again).
SECRET_FIELDS = frozenset({"api_key", "admin_api_key"})
REDACTED = "<redacted>"


def redact_secrets(value: Any, known: Sequence[str] = ()) -> Any:
    """A copy of a JSON value with every SECRET_FIELDS entry (at any depth) replaced, and
    every `known` secret replaced inside strings."""
    if isinstance(value, dict):
        return {
            k: (REDACTED if k in SECRET_FIELDS and v else redact_secrets(v, known))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_secrets(v, known) for v in value]
    if isinstance(value, str):
        for secret in filter(None, known):
            value = value.replace(secret, REDACTED)
    return value


def reply_failed(reply: Any) -> bool:
    """An exception, or an SGLang {"success": false, ...} answer."""
    if isinstance(reply, BaseException):
        return True
    return isinstance(reply, dict) and reply.get("success") is False
