"""The policy's batch format and token-budget micro-batching.

A `PolicyBatch` holds B right-padded sequences ``prompt + response + pad`` and per
response-token tensors [B, L] aligned so that response token j of row i sits at
input position ``prompt_lengths[i] + j`` (its log-prob comes from the logits at the
position before it).

Micro-batches are formed by a token budget (`parallel.micro_batch_tokens`), either as
right-padded rows or (`parallel.pack_sequences`) as packed rows: sequences back to back
in one row, attention confined to each sequence and positions restarting per sequence
(megatron's THD format; see `build_microbatches`).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, fields, replace

import torch
from torch import Tensor

from archer_mcore.model.pipeline import MicroBatch, causal_positions


@dataclass
class PolicyBatch:
    """Shapes: B sequences, T input positions, L response positions.

    input_ids:      [B, T] long, prompt then response then padding (any pad id).
    prompt_lengths: [B] long, number of prompt tokens of each row (>= 1).
    response_mask:  [B, L] bool, True on valid response tokens.
    old_logp, ref_logp: [B, L] fp32 log-probs of the response tokens (rollout/old
                    policy, reference policy); needed by `train_step` (ref only for KL).
    advantages:     [B] or [B, L] fp32.
    selection:      [B, L] bool, a precomputed forking-token mask (mini-batch scope).
    token_weights:  [B, L] fp32 per-token policy-gradient weights, e.g. truncated
                    importance-sampling weights for the rollout/training mismatch.
    """

    input_ids: Tensor
    prompt_lengths: Tensor
    response_mask: Tensor
    _: KW_ONLY  # the optional tensors by name
    old_logp: Tensor | None = None
    advantages: Tensor | None = None
    ref_logp: Tensor | None = None
    selection: Tensor | None = None
    token_weights: Tensor | None = None

    def __post_init__(self) -> None:
        b = self.input_ids.shape[0]
        if self.input_ids.dim() != 2 or self.prompt_lengths.shape != (b,):
            raise ValueError(
                f"input_ids must be [B, T] and prompt_lengths [B]; got {tuple(self.input_ids.shape)}, {tuple(self.prompt_lengths.shape)}"
            )
        if self.response_mask.dim() != 2 or self.response_mask.shape[0] != b:
            raise ValueError(f"response_mask must be [B, L], got {tuple(self.response_mask.shape)}")
        if bool((self.prompt_lengths < 1).any()):
            raise ValueError("every row needs at least one prompt token")
        if int(self.seq_lengths().max()) > self.input_ids.shape[1]:
            raise ValueError("response_mask reaches past the end of input_ids")

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def response_lengths(self) -> Tensor:
        """[B]: index of the last valid response token + 1 (0 for an empty response)."""
        m = self.response_mask.bool()
        idx = torch.arange(1, m.shape[1] + 1, device=m.device).expand_as(m)
        return torch.where(m, idx, torch.zeros_like(idx)).amax(-1)

    def seq_lengths(self) -> Tensor:
        return self.prompt_lengths + self.response_lengths()

    def rows(self, index: Tensor | slice) -> PolicyBatch:
        """The sub-batch of the given rows (e.g. this data-parallel rank's share)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = None if v is None else v[index]
        return PolicyBatch(**kw)


@dataclass
class MicroBatchPlan:
    """Rows of each micro-batch (indices into the batch) and their lengths.

    packed False: micro-batch k is `rows[k]` right-padded to `lengths[k]` positions
    ([b, lengths[k]] tokens). packed True: micro-batch k is one row, the sequences of
    `rows[k]` back to back then padding, `lengths[k]` tokens in all ([1, lengths[k]]).
    """

    rows: list[Tensor] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    packed: bool = False

    def tokens(self) -> list[int]:
        """Tokens each micro-batch runs through the model, padding included."""
        if self.packed:
            return list(self.lengths)
        return [len(r) * n for r, n in zip(self.rows, self.lengths)]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_microbatches(
    seq_lengths: Tensor,
    token_budget: int,
    max_rows: int | None = None,
    seq_multiple: int = 1,
    pack: bool = False,
) -> MicroBatchPlan:
    """Deterministic token-budget micro-batching (every pipeline stage forms the same
    micro-batches), rows taken longest first.

    pack False (padded rows): rows are added to the current micro-batch while
    rows x padded length <= token_budget; its length is the longest row's rounded up
    to a multiple of `seq_multiple` (TP under sequence parallelism, x16 under FP8).

    pack True (packed sequences): first-fit decreasing: each sequence goes into the
    first micro-batch whose total, rounded up to `seq_multiple`, stays <= token_budget
    (and that holds fewer than `max_rows` sequences), else into a new one. A micro-batch
    is one row of its sequences back to back, padded once at the end to the multiple.

    Either way a sequence longer than the budget gets a micro-batch of its own."""
    if seq_multiple < 1:
        raise ValueError(f"seq_multiple must be >= 1, got {seq_multiple}")
    order = torch.argsort(seq_lengths, descending=True, stable=True)
    plan = MicroBatchPlan(packed=pack)
    if pack:
        bins: list[list[int]] = []
        used: list[int] = []
        for i in order.tolist():
            n = int(seq_lengths[i])
            for k in range(len(bins)):
                room = max_rows is None or len(bins[k]) < max_rows
                if room and _round_up(used[k] + n, seq_multiple) <= token_budget:
                    bins[k].append(i)
                    used[k] += n
                    break
            else:
                bins.append([i])
                used.append(n)
        plan.rows = [torch.tensor(b) for b in bins]
        plan.lengths = [_round_up(u, seq_multiple) for u in used]
        return plan
    cur: list[int] = []
    cur_len = 0
    for i in order.tolist():
        n = _round_up(int(seq_lengths[i]), seq_multiple)
        new_len = max(cur_len, n)
        full = max_rows is not None and len(cur) >= max_rows
        if cur and (new_len * (len(cur) + 1) > token_budget or full):
            plan.rows.append(torch.tensor(cur))
            plan.lengths.append(cur_len)
            cur, new_len = [], n
        cur.append(i)
        cur_len = new_len
    if cur:
        plan.rows.append(torch.tensor(cur))
        plan.lengths.append(cur_len)
    return plan


def build_microbatches(batch: PolicyBatch, plan: MicroBatchPlan) -> list[MicroBatch]:
    """MicroBatches whose extras hold, for the loss, [b, Lm] tensors (b sequences, Lm
    their longest response): ``resp_pos`` (position, in the micro-batch row holding
    the sequence, of the logits predicting each response token), ``flat_pos`` (the
    same as an index into the model output flattened to [rows x positions, X]),
    ``targets``, ``mask``, and the batch's per-token inputs restricted to these rows;
    ``rows`` [b] says which batch rows they are.

    Padded plans: [b, s] rows right-padded with token 0 (causal attention: padding
    never changes the outputs at valid positions). Packed plans: one [1, T] row with
    position ids restarting at 0 for each sequence, and `cu_seqlens` [segments + 1]
    int32 / `max_seqlen` marking the sequences (and the trailing padding as a segment
    of its own) for megatron's THD attention; no position sees another sequence."""
    lengths = batch.response_lengths()
    if plan.packed:
        seq = batch.prompt_lengths + lengths
        return [
            _packed_microbatch(batch, rows, total, seq=seq[rows], lengths=lengths[rows])
            for rows, total in zip(plan.rows, plan.lengths)
        ]
    out = []
    for rows, seq_len in zip(plan.rows, plan.lengths):
        ids = batch.input_ids[rows, :seq_len]
        if ids.shape[1] < seq_len:
            ids = torch.nn.functional.pad(ids, (0, seq_len - ids.shape[1]))
        ids = ids.contiguous()
        lm = max(1, int(lengths[rows].max()))
        j = torch.arange(lm).unsqueeze(0)
        p = batch.prompt_lengths[rows].unsqueeze(1)
        target_pos = (p + j).clamp(max=seq_len - 1)
        resp_pos = (target_pos - 1).clamp(min=0)
        extras = {
            "rows": rows,
            "resp_pos": resp_pos,
            "flat_pos": resp_pos + torch.arange(len(rows)).unsqueeze(1) * seq_len,
            "targets": ids.gather(1, target_pos),
            "mask": batch.response_mask[rows, :lm].bool() & (p + j < seq_len),
        }
        _add_token_inputs(extras, batch, rows, lm)
        out.append(MicroBatch(ids, causal_positions(ids), extras))
    return out


def _packed_microbatch(
    batch: PolicyBatch, rows: Tensor, total: int, *, seq: Tensor, lengths: Tensor
) -> MicroBatch:
    """One packed micro-batch of `rows` ([1, total] tokens; `seq` / `lengths` [b]: the
    rows' sequence and response lengths); see `build_microbatches`."""
    starts = torch.cumsum(seq, 0) - seq  # [b] offset of each sequence in the row
    used = int(seq.sum())
    if used > total:
        raise ValueError(f"packed micro-batch of {used} tokens planned as {total}")
    pieces = [batch.input_ids[int(r), : int(n)] for r, n in zip(rows, seq)]
    positions = [torch.arange(int(n)) for n in seq]
    segments = seq.tolist()
    if total > used:  # trailing padding: token 0, a segment of its own
        pieces.append(batch.input_ids.new_zeros(total - used))
        positions.append(torch.arange(total - used))
        segments.append(total - used)
    ids = torch.cat(pieces).unsqueeze(0)
    pos = torch.cat(positions).unsqueeze(0)
    cu = torch.zeros(len(segments) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(segments), 0)
    lm = max(1, int(lengths.max()))
    j = torch.arange(lm).unsqueeze(0)
    p = batch.prompt_lengths[rows].unsqueeze(1)
    start = starts.unsqueeze(1)
    # the target stays inside its own sequence; positions past its end are masked
    target_pos = start + torch.minimum(p + j, seq.unsqueeze(1) - 1)
    # the logits one position earlier, kept inside the sequence (an empty response of a
    # 1-token sequence has none; its positions are masked)
    resp_pos = torch.maximum(target_pos - 1, start)
    extras = {
        "rows": rows,
        "resp_pos": resp_pos,
        "flat_pos": resp_pos,
        "targets": ids[0][target_pos],
        "mask": batch.response_mask[rows, :lm].bool() & (p + j < seq.unsqueeze(1)),
    }
    _add_token_inputs(extras, batch, rows, lm)
    return MicroBatch(ids, pos, extras, cu_seqlens=cu, max_seqlen=max(segments))


def _add_token_inputs(extras: dict, batch: PolicyBatch, rows: Tensor, lm: int) -> None:
    for name in ("old_logp", "ref_logp", "selection", "token_weights"):
        v = getattr(batch, name)
        if v is not None:
            extras[name] = v[rows, :lm]
    if batch.advantages is not None:
        a = batch.advantages[rows]
        extras["advantages"] = a if a.dim() == 1 else a[:, :lm]


def scatter_rows(dst: Tensor, rows: Tensor, src: Tensor) -> None:
    """dst[rows, :Lm] = src (src [b, Lm])."""
    dst[rows, : src.shape[1]] = src.to(dst.dtype)


def with_fields(batch: PolicyBatch, **kw: Tensor | None) -> PolicyBatch:
    return replace(batch, **kw)
