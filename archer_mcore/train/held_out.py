"""The loop's periodic held-out evaluation: avg@k / pass@k on `data.eval_files` (or
the synthetic task's held-out problems) with the eval sampling settings."""

from __future__ import annotations

import json
from pathlib import Path

from archer_mcore.config import Config
from archer_mcore.parallel.ranks import broadcast_object
from archer_mcore.train.components import Components
from archer_mcore.train.eval_metrics import EVAL_PASS_KS, summarize
from archer_mcore.train.sampling import eval_sampling_params
from archer_mcore.train.scoring import score_groups
from archer_mcore.utils.safe_files import write_atomic


def evaluate_held_out(cfg: Config, c: Components, step: int) -> dict[str, float]:
    """Rank 0 samples `eval.n_samples` responses per held-out prompt and scores them;
    writes the per-source summary to <output_dir>/eval/step_<step>.json and returns
    (on every rank) eval/accuracy (avg@n) and eval/pass@k; {} without held-out data."""
    result: dict[str, float] | None = None
    if c.is_main and c.eval_data is not None and len(c.eval_data):
        assert c.engine is not None and c.scorer is not None
        e = cfg.eval
        params = eval_sampling_params(cfg)
        prompts = list(c.eval_data)
        batch = c.engine.generate([p.prompt_ids for p in prompts], e.n_samples, params)
        groups = score_groups(c.scorer, c.tokenizer, prompts, batch)
        summary = summarize(
            [(g.data_source, [x > 0 for x in g.correct]) for g in groups],
            extra_ks=EVAL_PASS_KS,
        )
        allrow = summary["all"]
        result = {"eval/accuracy": allrow[f"avg@{e.n_samples}"]}
        result.update({f"eval/{k}": v for k, v in allrow.items() if k.startswith("pass@")})
        path = Path(cfg.train.output_dir) / "eval" / f"step_{step:06d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # renamed into place: a link planted at the name is replaced, never written through
        write_atomic(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return broadcast_object(result) or {}
