"""`checkpoint.every_minutes`: a checkpoint after the first step that ends that long
after the last save, for steps so long that `save_every` is never reached before a
pre-emption (issue 27, item 5).

The real trainer; the driver's ``latency`` hook makes every generate call take 10 s,
so each step lasts at least 10 s. With every_minutes = 0.25 (15 s) and save_every 0:
step 1 ends before 15 s have passed unless its own work took over 5 s; step 2 ends at
least 20 s after the start (and at least 10 s after a save at step 1), so it is always
saved; step 3 is the last and saved anyway. Without the setting only step 3 is.
"""

from __future__ import annotations

import pytest

LATENCY = {"per_call_s": 10.0, "per_token_s": 0.0}


def _saved_steps(archer, helpers, tmp_path, *overrides: str) -> set[int]:
    out = tmp_path / "run"
    proc = archer.run("train", [
        *helpers.FAST, "algorithm.group_filter=none", "train.steps=3",
        "checkpoint.save_every=0", f"train.output_dir={out}", *overrides,
    ], hooks={"latency": LATENCY}, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_minutes_saves_long_steps_and_off_saves_only_the_last(archer, helpers, tmp_path):
    timed = _saved_steps(archer, helpers, tmp_path / "timed", "checkpoint.every_minutes=0.25")
    assert {2, 3} <= timed, timed
    assert _saved_steps(archer, helpers, tmp_path / "off") == {3}
