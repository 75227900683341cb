"""The in-training eval writes eval/step_N.json by a rename, never through a link
planted at that name (issue 22 item 3: run files are not a way into other files)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_eval_result_replaces_a_planted_link_and_leaves_its_target(archer, helpers, tmp_path):
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    target = tmp_path / "victim.txt"
    target.write_text("precious\n")
    (out / "eval" / "step_000001.json").symlink_to(target)
    proc = archer.run("train", [*helpers.FAST, "train.steps=1", "eval.every=1",
                                f"train.output_dir={out}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert target.read_text() == "precious\n"
    written = out / "eval" / "step_000001.json"
    assert not written.is_symlink() and "all" in json.loads(written.read_text())
