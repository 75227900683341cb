"""`train.log_every`: step lines every N steps; metrics recorded at every step."""

from __future__ import annotations

import json
from pathlib import Path

from archer_mcore.config import config_from_dict
from archer_mcore.train.components import Components
from archer_mcore.train.progress import PhaseTimer


def _components(tmp_path: Path, log_every: int) -> Components:
    cfg = config_from_dict(
        {
            "train": {"steps": 7, "log_every": log_every, "output_dir": str(tmp_path)},
            "metrics": {"enabled": False},
        }
    )
    return Components(
        cfg=cfg,
        tokenizer=None,
        prompts=None,
        eval_data=None,
        policy=None,
        engine=None,
        scorer=None,
        exporter=None,
        checkpoint_root=tmp_path / "checkpoints",
        pad_id=0,
    )


def _report_seven_steps(c: Components, capsys) -> list[str]:
    for step in range(1, 8):
        metrics = {"reward/mean": step / 10}
        if step == 5:
            metrics["eval/accuracy"] = 0.5
        c.report(step, metrics, PhaseTimer())
    return capsys.readouterr().out.splitlines()


def test_step_lines_every_n_steps_plus_eval_and_last(tmp_path, capsys):
    c = _components(tmp_path, log_every=3)
    lines = _report_seven_steps(c, capsys)
    # 3 and 6 by the period, 5 for its eval result, 7 as the last step.
    assert [ln.split(" | ")[0] for ln in lines] == ["step 3/7", "step 5/7", "step 6/7", "step 7/7"]
    assert "reward 0.300" in lines[0] and "eval acc 0.500" in lines[1]
    # Every step is still recorded, printed or not.
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["reward/mean"] for r in rows] == [s / 10 for s in range(1, 8)]
    assert len(c.history) == 7


def test_log_every_1_prints_every_step(tmp_path, capsys):
    lines = _report_seven_steps(_components(tmp_path, log_every=1), capsys)
    assert [ln.split(" | ")[0] for ln in lines] == [f"step {s}/7" for s in range(1, 8)]
