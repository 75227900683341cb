"""Module-level functions the reward worker processes import by name (picklable).

The tests put this directory on the workers' PYTHONPATH (fixture `worker_pythonpath`).
"""

from __future__ import annotations

import os
import time
from typing import Any


def add(a: int, b: int) -> int:
    return a + b


def sleep_then_return(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


def hang(*_: Any) -> None:
    while True:
        pass


def raise_value_error(*_: Any) -> None:
    raise ValueError("bad reward")


def hog_memory(*_: Any) -> int:
    chunks = []
    while True:
        chunks.append(bytearray(64 * 1024 * 1024))


def die(*_: Any) -> None:
    os._exit(3)


def my_pid(*_: Any) -> int:
    return os.getpid()


# Reward functions for the registry (process execution: response, ground_truth, extra).
def exact_match_reward(response: str, ground_truth: Any, extra: dict[str, Any]) -> bool:
    return response.strip() == str(ground_truth)


def hanging_reward(response: str, ground_truth: Any, extra: dict[str, Any]) -> bool:
    hang()
    return True


def raising_reward(response: str, ground_truth: Any, extra: dict[str, Any]) -> bool:
    raise RuntimeError("reward bug")


def oom_reward(response: str, ground_truth: Any, extra: dict[str, Any]) -> bool:
    hog_memory()
    return True


def crashing_reward(response: str, ground_truth: Any, extra: dict[str, Any]) -> bool:
    os._exit(1)
