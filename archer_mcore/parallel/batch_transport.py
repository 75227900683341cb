"""Rank 0's rollout (scored groups of `Sample`s) on every rank, its token data as flat
arrays instead of a pickle (issue 21, item 2).

`broadcast_object_list` pickles every token id and log-prob as its own opcode (3 to 5
and 9 bytes) and unpickles them one Python object at a time; at the 32B presets (512
prompts x 16 samples, responses up to 20,480 tokens: ~75M tokens a step) that is a
~0.9 GB pickle, built and copied on rank 0 and copied and parsed on every rank while
all of them wait. Here the object is still pickled, but each `Sample`'s three lists
(prompt_ids, token_ids, logprobs) leave the pickle: it holds list indices, and the
values travel as flat int32 (token and prompt ids) and float32 (log-probs) arrays.

The conversions (list -> array on rank 0, array -> list on the receivers) cost about
what pickling and unpickling the values would; what is won is the bytes (8 a token,
not ~11) and the overlap: the arrays go in chunks of about `CHUNK_VALUES` values, sent
asynchronously as soon as made, so that the receivers turn chunk c back into lists
while rank 0 converts chunk c + 1. (An earlier try converted everything before sending
anything, with `torch.tensor(list)`, ~3x slower per value than pickling it, and lost.)
benchmarks/batch_broadcast.py measures it against `broadcast_object_list`.

Messages, in order (every rank derives the chunking from the lengths in the index):

    header  int64[6]   mode, pickle bytes, int segments, int lists, float lists,
                       chunk values
    index   int64[...] lengths of the int segments and of the float lists, and the
                       int segment of each int list
    meta    uint8      the pickle, each Sample reduced to its scalar fields + indices
    then per chunk (int chunks, then float chunks):
    code    int64[1]   the chunk's dtype: int32 / int64, float32 / float64 (the wide
                       type only when a value of the chunk needs it) or ABORT
    data    the chunk's values
    on ABORT (a value that is not a number): size int64[1], then the whole object as
    one plain pickle (uint8), which every rank returns instead.

Nothing is lost or changed: the receivers rebuild `Sample`s whose lists equal rank 0's
element by element (ints as ints; log-probs as the same doubles: float32 is used only
for chunks whose every value is exactly a float32, as the engines' values are, both
SGLang's and LocalEngine's come from float32 tensors). Object identity is kept as
pickle keeps it (a Sample in two lists, e.g. `SamplingOutcome.groups` and
`.all_groups`, is one object on the receivers too; a list shared by two Samples stays
shared). A group's samples carry equal but distinct prompt lists (SGLangEngine copies
the prompt per sample): a prompt equal to the previous sample's travels once and is
copied on the receivers. A Sample whose fields are not exactly lists, or a subclass,
is pickled as usual. Token ids must be integers, as the engine contract says
(`numpy.fromiter` would truncate a float token id).
"""

from __future__ import annotations

import io
import itertools
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from archer_mcore.rollout.types import Sample

CHUNK_VALUES = 1 << 20  # values per chunk (4 MiB of int32): the pipeline's grain
_HEADER = 6
_ARRAYS = 0
_ABORT = 4
# chunk codes: the dtypes, then _ABORT
_DTYPES = (np.int32, np.int64, np.float32, np.float64)
_TORCH = {np.int32: torch.int32, np.int64: torch.int64, np.float32: torch.float32,
          np.float64: torch.float64, np.uint8: torch.uint8}  # fmt: skip
_SAMPLE_FIELD_SET = frozenset(f.name for f in fields(Sample))


def _rebuild_sample(*args: Any) -> Sample:  # pragma: no cover - replaced when loading
    raise pickle.UnpicklingError("a Sample from batch_transport needs its arrays to load")


@dataclass(kw_only=True)
class Split:
    """Rank 0's object, pickled without its Samples' lists, and those lists."""

    meta: bytes = b""
    int_segments: list[list[int]] = field(default_factory=list)  # distinct int runs
    int_list_segment: list[int] = field(default_factory=list)  # int list k -> its segment
    float_lists: list[list[float]] = field(default_factory=list)


class _Pickler(pickle.Pickler):
    """Pickles Samples as (scalar fields, list indices); collects the lists."""

    def __init__(self, file: io.BytesIO, split: Split) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.split = split
        self._int_ids: dict[int, int] = {}  # id(list) -> int list k
        self._float_ids: dict[int, int] = {}
        self._keep: list[Any] = []  # the lists stay alive while their ids are keys
        self._prompt: int | None = None  # the segment of the last prompt

    def _int_list(self, values: list[int], prompt: bool = False) -> int:
        k = self._int_ids.get(id(values))
        if k is None:
            segs, seg_of = self.split.int_segments, self.split.int_list_segment
            # a prompt equal to the previous sample's (its group's) travels once
            if prompt and self._prompt is not None and segs[self._prompt] == values:
                seg = self._prompt
            else:
                seg = len(segs)
                segs.append(values)
                if prompt:
                    self._prompt = seg
            k = self._int_ids[id(values)] = len(seg_of)
            seg_of.append(seg)
            self._keep.append(values)
        return k

    def _float_list(self, values: list[float]) -> int:
        k = self._float_ids.get(id(values))
        if k is None:
            k = self._float_ids[id(values)] = len(self.split.float_lists)
            self.split.float_lists.append(values)
            self._keep.append(values)
        return k

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not Sample or obj.__dict__.keys() != _SAMPLE_FIELD_SET:
            return NotImplemented
        if not (type(obj.prompt_ids) is list and type(obj.token_ids) is list
                and type(obj.logprobs) is list):  # fmt: skip
            return NotImplemented
        return _rebuild_sample, (
            obj.prompt_index, obj.sample_index, self._int_list(obj.prompt_ids, True),
            self._int_list(obj.token_ids), self._float_list(obj.logprobs), obj.finish_reason,
            obj.weight_version, obj.request_id,
        )  # fmt: skip


def split(obj: Any) -> Split:
    """Rank 0: `obj`'s pickle without its Samples' lists, and the lists."""
    out = Split()
    buf = io.BytesIO()
    _Pickler(buf, out).dump(obj)
    out.meta = buf.getvalue()
    return out


def chunks(lengths: list[int], chunk_values: int) -> list[tuple[int, int]]:
    """Consecutive runs [a, b) of the lists with about `chunk_values` values each (a
    longer list is a chunk of its own)."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= chunk_values:
            out.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(lengths):
        out.append((start, len(lengths)))
    return out


def int_array(lists: list[list[int]]) -> np.ndarray:
    total = sum(map(len, lists))
    try:
        return np.fromiter(itertools.chain.from_iterable(lists), np.int32, total)
    except OverflowError:  # an id beyond int32: this chunk in int64
        return np.fromiter(itertools.chain.from_iterable(lists), np.int64, total)


def float_array(lists: list[list[float]]) -> np.ndarray:
    wide = np.fromiter(itertools.chain.from_iterable(lists), np.float64, sum(map(len, lists)))
    narrow = wide.astype(np.float32)
    # float32 only when it gives back every double exactly (NaNs compare unequal: float64)
    return narrow if np.array_equal(narrow, wide) else wide


def lists_of(values: np.ndarray, lengths: list[int]) -> list[list[Any]]:
    """The lists of the given lengths that `values` holds back to back (memoryview's
    tolist: Python ints / floats, a little faster than numpy's)."""
    view = memoryview(values)
    out, a = [], 0
    for n in lengths:
        out.append(view[a : a + n].tolist())
        a += n
    return out


def _i64(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(
        0, dtype=torch.uint8
    )


def messages(obj: Any, chunk_values: int = CHUNK_VALUES) -> Iterator[torch.Tensor]:
    """Rank 0: the tensors to broadcast, in order (see the module docstring); each is
    made when the previous one has been handed over, so sending overlaps converting."""
    parts = split(obj)
    int_lengths = list(map(len, parts.int_segments))
    float_lengths = list(map(len, parts.float_lists))
    yield _i64(_ARRAYS, len(parts.meta), len(int_lengths), len(parts.int_list_segment),
               len(float_lengths), chunk_values)  # fmt: skip
    yield torch.from_numpy(np.array([*int_lengths, *float_lengths, *parts.int_list_segment],
                                    dtype=np.int64))  # fmt: skip
    yield _bytes(parts.meta)
    for lists, lengths, convert in ((parts.int_segments, int_lengths, int_array),
                                    (parts.float_lists, float_lengths, float_array)):  # fmt: skip
        for a, b in chunks(lengths, chunk_values):
            try:
                arr = convert(lists[a:b])
            except (TypeError, ValueError, OverflowError):  # not numbers: one plain pickle
                plain = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
                yield _i64(_ABORT)
                yield _i64(len(plain))
                yield _bytes(plain)
                return
            yield _i64(_DTYPES.index(arr.dtype.type))
            yield torch.from_numpy(arr)


def receive(recv: Callable[[int, torch.dtype], torch.Tensor]) -> Any:
    """The receivers: the object from the messages, `recv(numel, dtype)` giving the
    next one."""
    mode, n_meta, n_segs, n_int_lists, n_floats, chunk_values = recv(_HEADER, torch.int64).tolist()
    if mode != _ARRAYS:
        raise RuntimeError(f"batch_transport: unknown mode {mode} (ranks at different versions?)")
    index = recv(n_segs + n_floats + n_int_lists, torch.int64).tolist()
    meta = recv(n_meta, torch.uint8).numpy().tobytes()
    int_lengths, float_lengths = index[:n_segs], index[n_segs : n_segs + n_floats]
    seg_of = index[n_segs + n_floats :]
    received: list[list[list[Any]]] = [[], []]  # int segments, float lists
    for out, lengths in zip(received, (int_lengths, float_lengths)):
        for a, b in chunks(lengths, chunk_values):
            (code,) = recv(1, torch.int64).tolist()
            if code == _ABORT:
                (size,) = recv(1, torch.int64).tolist()
                return pickle.loads(recv(size, torch.uint8).numpy().tobytes())
            dtype = _DTYPES[code]
            values = recv(sum(lengths[a:b]), _TORCH[dtype]).numpy()
            out.extend(lists_of(values, lengths[a:b]))
            del values
    segments, float_lists = received
    taken = [False] * len(segments)  # a segment's first list is it, later ones copies
    int_lists: dict[int, list[int]] = {}

    def int_list(k: int) -> list[int]:
        values = int_lists.get(k)
        if values is None:
            seg = seg_of[k]
            values = segments[seg].copy() if taken[seg] else segments[seg]
            taken[seg] = True
            int_lists[k] = values
        return values

    def rebuild(prompt_index: int, sample_index: int, prompt: int, tokens: int, logprobs: int,
                finish_reason: Any, weight_version: int, request_id: str) -> Sample:  # fmt: skip
        return Sample(
            prompt_index=prompt_index,
            sample_index=sample_index,
            prompt_ids=int_list(prompt),
            token_ids=int_list(tokens),
            logprobs=float_lists[logprobs],
            finish_reason=finish_reason,
            weight_version=weight_version,
            request_id=request_id,
        )

    return _Unpickler(io.BytesIO(meta), rebuild).load()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, rebuild: Callable[..., Sample]) -> None:
        super().__init__(file)
        self._rebuild = rebuild

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_rebuild_sample":
            return self._rebuild
        return super().find_class(module, name)


def broadcast_samples(obj: Any, group: Any, chunk_values: int = CHUNK_VALUES) -> Any:
    """Rank 0's `obj` on every rank of `group` (a gloo group: the tensors are on the
    CPU), its Samples' lists sent as arrays; rank 0 gets `obj` itself back. Collective."""
    if dist.get_rank(group) == 0:
        pending = []  # (work, its tensor: kept alive until the send is through)
        for t in messages(obj, chunk_values):
            if t.numel():
                pending.append((dist.broadcast(t, src=0, group=group, async_op=True), t))
        for work, _ in pending:
            work.wait()
        return obj

    def recv(numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(numel, dtype=dtype)
        if numel:
            dist.broadcast(t, src=0, group=group)
        return t

    return receive(recv)


def wire_bytes(obj: Any, chunk_values: int = CHUNK_VALUES) -> int:
    """The bytes `broadcast_samples` sends for `obj`."""
    return sum(t.numel() * t.element_size() for t in messages(obj, chunk_values))
