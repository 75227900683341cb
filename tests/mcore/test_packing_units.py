"""Packed micro-batches by hand: the first-fit-decreasing plan (exact budget, splits,
over-budget sequences, the SP/FP8 length multiple), the packed row with its positions,
cu_seqlens and loss positions, and the block-diagonal causal mask the tests use as the
reference of the local spec's packed attention."""

from __future__ import annotations

import torch
from packing_workers import block_diagonal_causal_mask

from archer_mcore.actor.policy_batch import PolicyBatch, build_microbatches, plan_microbatches


def test_first_fit_decreasing_plan_by_hand():
    # lengths 5, 9, 3, 12, 7 (rows 0..4), budget 12:
    # 12 -> [3]; 9 -> [1]; 7 -> [4]; 5 -> [4, 0] (12, exactly the budget); 3 -> [1, 2]
    plan = plan_microbatches(torch.tensor([5, 9, 3, 12, 7]), 12, pack=True)
    assert plan.packed and [r.tolist() for r in plan.rows] == [[3], [1, 2], [4, 0]]
    assert plan.lengths == [12, 12, 12] and plan.tokens() == [12, 12, 12]
    # budget 30: everything but ... 12 + 9 + 7 = 28, 5 does not fit (33), 3 does not (31)
    plan = plan_microbatches(torch.tensor([5, 9, 3, 12, 7]), 30, pack=True)
    assert [r.tolist() for r in plan.rows] == [[3, 1, 4], [0, 2]] and plan.lengths == [28, 8]
    # a sequence over the budget: a micro-batch of its own, nothing added to it
    plan = plan_microbatches(torch.tensor([20, 2, 3]), 12, pack=True)
    assert [r.tolist() for r in plan.rows] == [[0], [2, 1]] and plan.lengths == [20, 5]
    # max_rows caps the sequences per pack
    plan = plan_microbatches(torch.tensor([2, 2, 2]), 100, max_rows=2, pack=True)
    assert [len(r) for r in plan.rows] == [2, 1]


def test_packed_totals_round_to_the_multiple_within_the_budget():
    # x16 (FP8): 13 -> 16; 13 + 9 = 22 -> 32 <= 32 fits; 4: 26 -> 32 fits too.
    plan = plan_microbatches(torch.tensor([13, 9, 4]), 32, seq_multiple=16, pack=True)
    assert [r.tolist() for r in plan.rows] == [[0, 1, 2]] and plan.lengths == [32]
    # budget 31 (not a multiple): 13 + 9 = 22 -> 32 > 31, so 9 opens a second pack
    plan = plan_microbatches(torch.tensor([13, 9, 4]), 31, seq_multiple=16, pack=True)
    assert [r.tolist() for r in plan.rows] == [[0], [1, 2]] and plan.lengths == [16, 16]


def test_packed_microbatch_by_hand():
    # row 0: prompt [5 6], response [7 8 9]; row 1: prompt [4], response [3] then pads;
    # row 2: prompt [1 2 3], response [4 5].
    ids = torch.tensor([[5, 6, 7, 8, 9], [4, 3, 0, 0, 0], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    adv = torch.tensor([1.0, -1.0, 0.5])
    batch = PolicyBatch(ids, torch.tensor([2, 1, 3]), mask, advantages=adv)
    plan = plan_microbatches(batch.seq_lengths(), 16, seq_multiple=4, pack=True)
    (mb,) = build_microbatches(batch, plan)
    # longest first: rows 0 (5), 2 (5), 1 (2) = 12 tokens, a multiple of 4 already
    assert mb.extras["rows"].tolist() == [0, 2, 1]
    assert mb.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 4, 3]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]]
    assert mb.cu_seqlens.tolist() == [0, 5, 10, 12] and mb.max_seqlen == 5
    # response token j of a sequence starting at s is predicted at s + prompt + j - 1;
    # past a sequence's end (masked) the index stays on its own last position
    assert mb.extras["resp_pos"].tolist() == [[1, 2, 3], [7, 8, 8], [10, 10, 10]]
    assert torch.equal(mb.extras["flat_pos"], mb.extras["resp_pos"])
    assert mb.extras["targets"].tolist() == [[7, 8, 9], [4, 5, 5], [3, 3, 3]]
    assert mb.extras["mask"].tolist() == [[True] * 3, [True, True, False], [True, False, False]]
    assert mb.extras["advantages"].tolist() == [1.0, 0.5, -1.0]
    # trailing padding is a segment of its own
    (mb,) = build_microbatches(batch, plan_microbatches(batch.seq_lengths(), 16, 8, 8, True))
    assert mb.input_ids.shape == (1, 16) and mb.input_ids[0, 12:].tolist() == [0] * 4
    assert mb.cu_seqlens.tolist() == [0, 5, 10, 12, 16]
    assert mb.position_ids[0, 12:].tolist() == [0, 1, 2, 3]


def test_empty_response_stays_inside_its_own_sequence():
    # row 0: a 1-token prompt and no response; row 1: prompt [4], response [3]
    ids = torch.tensor([[7, 0], [4, 3]])
    mask = torch.tensor([[False], [True]])
    batch = PolicyBatch(ids, torch.tensor([1, 1]), mask)
    (mb,) = build_microbatches(batch, plan_microbatches(batch.seq_lengths(), 8, pack=True))
    assert mb.extras["rows"].tolist() == [1, 0] and mb.input_ids.tolist() == [[4, 3, 7]]
    assert mb.extras["resp_pos"].tolist() == [[0], [2]]  # row 0 points at its own token
    assert mb.extras["mask"].tolist() == [[True], [False]]


def test_padded_rows_flat_positions_index_the_flattened_output():
    ids = torch.tensor([[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    batch = PolicyBatch(ids, torch.tensor([2, 1]), mask)
    (mb,) = build_microbatches(batch, plan_microbatches(batch.seq_lengths(), 100))
    assert mb.cu_seqlens is None and mb.input_ids.shape == (2, 5)
    assert mb.extras["flat_pos"].tolist() == [[1, 2, 3], [5, 6, 7]]  # row 1 starts at 5


def test_block_diagonal_causal_mask_by_hand():
    m = block_diagonal_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)[0, 0]
    allowed = ~m
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expect)
