"""The contract every reward kind keeps (issue 25 item 3), checked for every kind the
registry holds: the built-in math and code kinds and the kinds this test's config adds
from tests/rewards/custom_reward_kinds.py (a new built-in kind joins automatically).

1. A pure function of (response, ground truth, extra): the same inputs give the same
   result, whatever was scored before (no hidden state).
2. No exception escapes, whatever the inputs: empty, huge, lone surrogates and NULs,
   unbalanced or deeply nested braces, a ground truth of None, a number, a NaN, a
   mapping, a huge string.
3. Bounded time, as the trainer runs it: a process kind within its timeout (the worker
   is killed there; math-verify's LaTeX parser takes minutes on deeply nested braces
   or a huge ground truth, and those score TIMEOUT), a sandbox kind within its program
   limits, an inline kind within a second.
4. The result keeps `types.check_result` (score and fraction_passed finite in [0, 1],
   correct a bool) and pickles back equal (results cross process boundaries).

Code kinds run in the real sandbox (skipped where it cannot isolate, as in
test_sandbox.py)."""

from __future__ import annotations

import dataclasses
import pickle
import re
import time
from typing import Any

import pytest

from archer_mcore.config import config_from_dict
from archer_mcore.rewards.config_kinds import registry_from_config
from archer_mcore.rewards.registry import RewardKind
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, probe_isolation
from archer_mcore.rewards.scorer import RewardScorer
from archer_mcore.rewards.types import TIMEOUT, RewardRequest, RewardResult, check_result

pytestmark = pytest.mark.usefixtures("worker_pythonpath")

CONFIG = config_from_dict(
    {
        "rewards": {
            "math_timeout_s": 5.0,
            "code_timeout_s": 2.0,
            "code_memory_mb": 512,
            "num_workers": 2,
            "kinds": [
                {
                    "name": "partial_credit",
                    "fn": "custom_reward_kinds:boxed_partial_credit",
                    "graded": True,
                },
                {
                    "name": "digits",
                    "fn": "custom_reward_kinds:digit_overlap",
                    "execution": "inline",
                    "graded": True,
                },
            ],
        }
    }
)
REGISTRY = registry_from_config(CONFIG.rewards)
KINDS = sorted(REGISTRY.kinds)
PROGRAM = "```python\nprint(int(input()) * 2)\n```"
STDIO = {"inputs": ["3\n", "5\n"], "outputs": ["6\n", "10\n"]}
DEEP = "\\boxed{" + "{" * 1500 + "}" * 1500 + "}"

# (response, ground truth, extra): each adversarial input next to ordinary ones
CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("the sum is \\boxed{6}", "6", {}),
    ("\\boxed{7}", "6", {}),
    ("", "6", {}),
    ("", None, {}),
    ("\\boxed{6}", None, {}),
    ("\\boxed{6}", 6, {}),
    ("\\boxed{6}", float("nan"), {}),
    ("\\boxed{6}", {"not": "an answer"}, {}),
    ("\\boxed{6}", ["6", "7"], {}),
    ("\\boxed{6}", "", {}),
    ("\\boxed{}", "6", {}),
    ("\\boxed{" * 300, "6", {}),
    ("}" * 300 + "\\boxed{6", "6", {}),
    ("x" * 1_000_000 + " \\boxed{6}", "6", {}),
    ("\udcff\x00\ufffd \\boxed{\udc80}", "6", {}),
    (DEEP, "6", {}),  # minutes of LaTeX parsing: the pool's timeout bounds it
    ("\\boxed{6}", "x" * 30_000, {}),
    (PROGRAM, STDIO, {}),
    (PROGRAM, STDIO, {"fn_name": None}),
    ("```python\nprint(7)\n```", STDIO, {}),
    ("```python\nwhile True:\n    pass\n```", STDIO, {}),
    ("```python\nprint('x' * 10**8)\n```", STDIO, {}),
    (PROGRAM, {"inputs": ["3\n"]}, {}),
    (PROGRAM, "not json {", {}),
    (PROGRAM, None, {}),
    ("```python\n" + "\udcff" * 10 + "\n```", STDIO, {}),
]


def _limit_s(kind: RewardKind) -> float:
    """How long the trainer lets one call of `kind` take, seconds (plus start-up)."""
    rewards = CONFIG.rewards
    if kind.execution == "process":
        return kind.timeout_s if kind.timeout_s is not None else rewards.math_timeout_s
    if kind.execution == "sandbox":  # score_code: stdio budget 3x the wall limit, calls 1x
        return 4 * rewards.code_timeout_s
    return 1.0


def _verdict(r: RewardResult) -> tuple[Any, ...]:
    """What must not change between two scorings of the same input (the elapsed time
    may, and so may a timeout's message and the seconds a detail quotes, as in "wall-time
    limit exceeded (2.1s)")."""
    detail = "" if r.failure == TIMEOUT else re.sub(r"\d+(\.\d+)?s\b", "<t>s", r.detail)
    return (r.score, r.correct, r.fraction_passed, r.failure, r.graded, detail)


def _needs_sandbox(name: str) -> None:
    if REGISTRY.kinds[name].execution == "sandbox" and not probe_isolation().net:
        pytest.skip("no network namespace on this machine; the sandbox refuses to run")


def test_every_registered_kind_is_checked() -> None:
    assert KINDS == ["code", "digits", "math", "partial_credit"]
    assert {REGISTRY.kinds[k].execution for k in KINDS} == {"process", "sandbox", "inline"}


@pytest.mark.slow  # worker and sandbox processes; a few 5 s timeouts
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", KINDS)
def test_the_reward_contract_as_the_trainer_runs_it(name: str) -> None:
    _needs_sandbox(name)
    kind = REGISTRY.kinds[name]
    requests = [
        RewardRequest(response=r, ground_truth=gt, kind=name, extra=extra) for r, gt, extra in CASES
    ]
    with RewardScorer.from_config(CONFIG.rewards, registry=REGISTRY) as scorer:
        scorer.score_batch(requests[:2])  # start the workers (not charged to a call)
        first = scorer.score_batch(requests)
        # the same inputs again, in the other order: no state carried between calls
        second = scorer.score_batch(requests[::-1])[::-1]
    slack = 10.0  # a killed worker's replacement, a loaded machine
    for (resp, gt, _), a, b in zip(CASES, first, second):
        where = f"{name}: response {resp[:40]!r}, ground truth {str(gt)[:40]!r}"
        assert check_result(a) is None, (where, a)
        assert a.graded is kind.graded, where
        assert a.elapsed_s <= _limit_s(kind) + slack, (where, a.elapsed_s)
        assert _verdict(a) == _verdict(b), (where, a, b)
        assert pickle.loads(pickle.dumps(a)) == a, where
        assert a.failure != "reward_error", (where, a.detail)  # nothing raised


def _call(kind: RewardKind, sandbox: Sandbox | None, case: tuple[str, Any, dict]) -> Any:
    response, ground_truth, extra = case
    if kind.execution == "sandbox":
        return kind.fn(response, ground_truth, dict(extra), sandbox)
    return kind.fn(response, ground_truth, dict(extra))


#: The inputs math-verify takes minutes on in-process (bounded by the pool's timeout,
#: checked above): the in-process checks below leave them out.
UNBOUNDED_IN_PROCESS = {DEEP, "x" * 30_000}


@pytest.mark.parametrize("name", KINDS)
def test_a_reward_is_a_pure_function_that_never_raises(name: str) -> None:
    """Called directly, in this process: A, then everything else, then A again gives
    A's result; nothing raises; the value is a RewardResult, bool or number, which as
    the scorer reads it keeps the contract and pickles back equal."""
    from archer_mcore.rewards.scorer import _coerce

    _needs_sandbox(name)
    kind = REGISTRY.kinds[name]
    sandbox = None
    if kind.execution == "sandbox":
        sandbox = Sandbox(SandboxLimits(wall_s=2.0, cpu_s=2.0, memory_mb=512), base_uid=300_000)
    cases = [c for c in CASES if not {c[0], str(c[1])} & UNBOUNDED_IN_PROCESS]
    if kind.execution != "sandbox":
        cases = [c for c in cases if "```" not in c[0]]  # programs are the code kind's
    first = {}
    for i, case in enumerate(cases):
        start = time.monotonic()
        value = _call(kind, sandbox, case)
        took = time.monotonic() - start
        result = _coerce(value, kind.graded)
        assert check_result(result) is None, (case[0][:40], result)
        assert took <= _limit_s(kind) + 10.0 or kind.execution == "process", (case[0][:40], took)
        assert pickle.loads(pickle.dumps(result)) == result
        first[i] = result
    for i in reversed(range(len(cases))):
        again = _coerce(_call(kind, sandbox, cases[i]), kind.graded)
        assert _verdict(dataclasses.replace(again, elapsed_s=0.0)) == _verdict(
            dataclasses.replace(first[i], elapsed_s=0.0)
        ), cases[i][0][:40]
