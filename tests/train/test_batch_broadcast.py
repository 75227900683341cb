"""Rank 0's rollout reaches the other ranks unchanged, its token data as arrays
(issue 21, item 2: parallel/batch_transport.py, ranks.broadcast_rollout).

"Unchanged" is checked strictly: the received object pickles to the same bytes as
rank 0's, which compares every field, the exact type of every value (an int is not a
numpy int, a float keeps its bits, NaN included) and which objects are shared (pickle's
memo). The cases: groups of different prompt and response lengths, empty (aborted)
responses, zero groups, a SamplingOutcome whose kept groups are also in all_groups,
ids beyond int32 and log-probs that are not float32 values (the wide arrays), a sample
whose lists are not lists (log-probs None: pickled as before), and values that are not
numbers (the whole object as one pickle).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import socket
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from archer_mcore.parallel import batch_transport as bt
from archer_mcore.rollout.types import Sample
from archer_mcore.train.advantage_batch import ScoredGroup
from archer_mcore.train.dynamic_sampling import SamplingOutcome


def _f32(x: float) -> float:
    return float(np.float32(x))


def _group(g: int, n: int, prompt_len: int, lengths: list[int]) -> ScoredGroup:
    prompt = [(7 * g + i) % 151_936 for i in range(prompt_len)]
    samples = [
        Sample(
            prompt_index=g,
            sample_index=j,
            prompt_ids=list(prompt),  # equal but distinct prompt lists, as SGLangEngine's
            token_ids=[(1000 * g + 37 * j + t) % 151_936 for t in range(lengths[j])],
            logprobs=[_f32(-0.01 * (t + 1) * (j + 1)) for t in range(lengths[j])],
            finish_reason="abort" if lengths[j] == 0 else ("length" if j % 2 else "stop"),
            weight_version=g // 2,
            request_id=f"req-{g}-{j}",
        )
        for j in range(n)
    ]
    return ScoredGroup(samples, [float(j % 2) for j in range(n)], data_source=f"src{g % 3}")


def _empty_sample() -> Sample:
    return Sample(
        prompt_index=0, sample_index=0, prompt_ids=[1], token_ids=[], logprobs=[],
        finish_reason="abort",
    )


def cases() -> dict[str, Any]:
    """name -> rank 0's object (built the same on every rank, to compare against)."""
    groups = [_group(g, 4, 3 + 5 * g, [(g * 13 + j * 7) % 40 for j in range(4)])
              for g in range(6)]  # fmt: skip
    groups[1].samples[2] = Sample(  # empty response
        prompt_index=1, sample_index=2, prompt_ids=[5, 6], token_ids=[], logprobs=[],
        finish_reason="abort",
    )
    shared = _group(9, 3, 4, [2, 3, 0])
    shared.samples[1].prompt_ids = shared.samples[0].prompt_ids  # one list object twice
    wide = _group(10, 2, 2, [3, 2])
    wide.samples[0].token_ids[1] = 2**40  # beyond int32
    wide.samples[1].logprobs[:] = [0.1, -math.inf]  # 0.1 is not a float32
    special = _group(11, 2, 1, [3, 1])
    special.samples[0].logprobs[:] = [math.nan, -0.0, math.inf]
    none_lp = _group(12, 2, 2, [2, 1])
    none_lp.samples[1].logprobs = None  # not a list: this sample is pickled as before
    odd = _group(13, 2, 2, [1, 1])
    odd.samples[0].token_ids[0] = "x"  # not a number: the whole object as one pickle
    kept = [groups[0], groups[2], shared]
    outcome = SamplingOutcome(
        groups=kept,
        generation_batches=2,
        generated_groups=7,
        dropped_groups=4,
        full=True,
        all_groups=[*groups, shared],
    )
    return {
        "groups": groups,
        "zero groups": [],
        "outcome": outcome,
        "empty outcome": SamplingOutcome(
            groups=[], generation_batches=1, generated_groups=0, dropped_groups=0, full=False
        ),
        "shared list": [shared],
        "wide arrays": [wide, special],
        "logprobs None": [none_lp, groups[3]],
        "not numbers": [odd],
        "one empty sample": [ScoredGroup([_empty_sample()], [0.0])],
    }


def _same(a: Any, b: Any) -> bool:
    return pickle.dumps(a) == pickle.dumps(b)


def _roundtrip(obj: Any, chunk_values: int = bt.CHUNK_VALUES) -> Any:
    """rank 0's messages fed to the receivers' side in one process (each read checks
    the size and dtype the receiver expects)."""
    sent = iter(list(bt.messages(obj, chunk_values)))

    def recv(numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = next(sent)
        assert (t.numel(), t.dtype) == (numel, dtype)
        return t.clone()

    got = bt.receive(recv)
    assert next(sent, None) is None  # every message read
    return got


@pytest.mark.parametrize("chunk_values", [bt.CHUNK_VALUES, 1, 7])
@pytest.mark.parametrize("name", list(cases()))
def test_messages_give_back_rank_0s_object(name: str, chunk_values: int) -> None:
    obj = cases()[name]
    assert _same(_roundtrip(obj, chunk_values), obj)


def test_the_token_data_leaves_the_pickle() -> None:
    short = [_group(g, 4, 8, [5] * 4) for g in range(4)]
    long = [_group(g, 4, 8, [5000] * 4) for g in range(4)]
    assert len(bt.split(long).meta) == len(bt.split(short).meta)  # only metadata
    parts = bt.split(long)
    # each group's 4 equal prompts travel once
    assert list(map(len, parts.int_segments)) == [8, 5000, 5000, 5000, 5000] * 4
    assert bt.int_array(parts.int_segments).dtype == np.int32
    assert bt.float_array(parts.float_lists).dtype == np.float32
    # 8 bytes a token, not 12 (these ids are < 65536: 3 bytes each in a pickle)
    assert bt.wire_bytes(long) < 0.7 * len(pickle.dumps(long))


def test_wide_values_use_wide_arrays_in_their_chunk_only() -> None:
    sent = list(bt.messages(cases()["wide arrays"], chunk_values=1))
    dtypes = {t.dtype for t in sent[3:][1::2]}  # the chunks' data
    assert dtypes == {torch.int32, torch.int64, torch.float32, torch.float64}


def test_values_that_are_not_numbers_go_as_one_pickle() -> None:
    sent = list(bt.messages(cases()["not numbers"]))
    assert int(sent[-3]) == bt._ABORT and len(sent[-1]) == int(sent[-2])


def test_received_lists_are_distinct_where_rank_0s_are() -> None:
    got = _roundtrip(cases()["shared list"])[0].samples
    assert got[0].prompt_ids is got[1].prompt_ids  # shared on rank 0: shared here
    assert got[2].prompt_ids is not got[0].prompt_ids  # equal but distinct on rank 0
    got[2].prompt_ids.append(1)
    assert got[0].prompt_ids != got[2].prompt_ids


def test_identity_of_samples_and_groups_is_kept() -> None:
    got = _roundtrip(cases()["outcome"])
    assert got.groups[0] is got.all_groups[0] and got.groups[2] is got.all_groups[-1]


# ------------------------------------------------------------------------- 2 processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, backend: str, out: str) -> None:
    from archer_mcore.parallel.ranks import broadcast_rollout, destroy_control_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend=backend, rank=rank, world_size=2)
    try:
        res = {}
        for name, obj in cases().items():
            got = broadcast_rollout(obj if rank == 0 else None)
            res[name] = (got is obj) if rank == 0 else _same(got, obj)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(res, f)
    finally:
        destroy_control_group()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", "cuda:gloo"])
def test_two_ranks_receive_rank_0s_rollout(tmp_path, backend: str) -> None:
    """On 2 gloo ranks; "cuda:gloo" is a default group that refuses CPU tensors, as
    NCCL does: the transport runs on the control group."""
    out = str(tmp_path / "res")
    mp.start_processes(_worker, args=(_free_port(), backend, out), nprocs=2,
                       start_method="spawn")  # fmt: skip
    for rank in (0, 1):
        with open(f"{out}.{rank}") as f:
            res = json.load(f)
        assert res == dict.fromkeys(cases(), True), (rank, res)
