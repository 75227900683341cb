"""A new token rule without editing the package (issue 25): the rule below lives in
this test file, the config selects it by import path, the loss matches a float64
reference, and the real trainer trains 2 CPU steps with it while its groups reach
metrics.jsonl and the Prometheus endpoint.

The rule: "bottom-20% entropy tokens only". Of each call's N valid tokens (a
micro-batch), the k = max(1, ceil(0.2 N)) lowest-entropy tokens form the group `low`
and carry policy gradient, under a clip range of their own; the rest (`rest`) carry
none. The normaliser stays the valid tokens (TokenRuleBase's default).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor

from archer_mcore.algo.losses import policy_loss
from archer_mcore.algo.token_rules import TokenRuleBase
from archer_mcore.config import (
    AlgorithmConfig,
    ConfigError,
    TokenRuleConfig,
    config_from_dict,
    dump_yaml,
    load_config,
)
from archer_mcore.config.fields import checked

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


# ------------------------------------------------------------------ the new rule
@dataclass(kw_only=True)
class BottomEntropySettings(TokenRuleConfig):
    """The bottom-entropy rule's settings."""

    fraction: float = checked(0.2, gt=0.0, le=1.0)
    """Share of the valid tokens trained: the lowest max(1, ceil(fraction N)) entropies."""
    low_clip: float = checked(0.1, ge=0.0, lt=1.0)
    """Clip eps, both sides, of the trained low-entropy tokens."""


class BottomEntropyRule(TokenRuleBase):
    """Only the lowest-entropy tokens of each micro-batch carry policy gradient."""

    settings_class = BottomEntropySettings
    groups = ("low", "rest")
    settings: BottomEntropySettings

    def __init__(self, algorithm: AlgorithmConfig) -> None:
        super().__init__(algorithm)
        self.settings = algorithm.token_rule  # type: ignore[assignment]

    def token_groups(self, entropy, mask, dp_group=None, selection=None) -> dict[str, Tensor]:
        n = int(mask.sum())
        k = max(1, math.ceil(round(self.settings.fraction * n, 9))) if n else 0
        order = torch.sort(entropy.float().masked_fill(~mask, math.inf).flatten(), stable=True)
        low = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
        low[order.indices[:k]] = True
        low = low.view_as(mask)
        return {"low": low, "rest": mask & ~low}

    def clip_ranges(self) -> dict[str, tuple[float, float]]:
        return {"low": (self.settings.low_clip, self.settings.low_clip)}

    def gradient_mask(self, groups: dict[str, Tensor]) -> Tensor:
        return groups["low"]


PATH = f"{BottomEntropyRule.__module__}:BottomEntropyRule"


# ------------------------------------------------------------------ config and loss
def _config(tmp_path: Path, rule: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(f"algorithm:\n  name: grpo\n  kl_coef: 0.05\n  token_rule: {rule}\n")
    return p


def test_the_rule_is_selected_from_yaml_with_its_own_settings(tmp_path, capsys):
    a = load_config(_config(tmp_path, f'{{name: "{PATH}", fraction: 0.3}}')).algorithm
    assert a.token_rule == BottomEntropySettings(name=PATH, fraction=0.3)
    cfg = load_config(_config(tmp_path, f'"{PATH}"'))  # the bare path: defaults
    assert cfg.algorithm.token_rule == BottomEntropySettings(name=PATH)
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg  # the resolved YAML
    with pytest.raises(ConfigError, match="did you mean algorithm.token_rule.fraction"):
        load_config(_config(tmp_path, f'{{name: "{PATH}", fractio: 0.3}}'))
    with pytest.raises(ConfigError, match="algorithm.token_rule.fraction = 1.5 is out of range"):
        load_config(_config(tmp_path, f'{{name: "{PATH}", fraction: 1.5}}'))
    # `archer config show --doc` prints the rule's own field docs
    from archer_mcore.cli import main

    assert main(["config", "show", str(_config(tmp_path, f'"{PATH}"')), "--doc"]) == 0
    out = capsys.readouterr().out
    assert (
        "    # Clip eps, both sides, of the trained low-entropy tokens.\n    low_clip: 0.1\n" in out
    )


def _reference_f64(logp, old, adv, mask, ent, ref, fraction, eps, c, kl_coef) -> float:
    """The loss by its definition, token by token in Python floats: the k lowest
    entropies (ties by position) carry the clipped PPO term with eps; token-mean over
    all N valid tokens; plus kl_coef times the k3 KL mean over the valid tokens."""
    tokens = [(float(ent[i, j]), i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1])
              if mask[i, j]]  # fmt: skip
    n = len(tokens)
    k = max(1, math.ceil(fraction * n - 1e-9))
    low = {(i, j) for _, i, j in sorted(tokens)[:k]}
    pg = kl = 0.0
    for _, i, j in tokens:
        d = float(ref[i, j]) - float(logp[i, j])
        kl += math.exp(d) - d - 1.0
        if (i, j) not in low:
            continue
        r = math.exp(float(logp[i, j]) - float(old[i, j]))
        a = float(adv[i])
        term = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))
        if a < 0:
            term = min(term, -a * c)
        pg += term
    return pg / n + kl_coef * kl / n


def test_the_loss_matches_a_float64_reference():
    g = torch.Generator().manual_seed(11)
    b, length = 5, 9
    mask = torch.arange(length)[None, :] < torch.tensor([9, 3, 6, 1, 7])[:, None]
    old = -torch.rand(b, length, generator=g, dtype=torch.float64) * 2
    logp = old + 0.3 * torch.randn(b, length, generator=g, dtype=torch.float64)
    ref = old + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    ent = torch.rand(b, length, generator=g, dtype=torch.float64) * 2
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    cfg = AlgorithmConfig(
        token_rule=BottomEntropySettings(name=PATH, fraction=0.2, low_clip=0.05),
        kl_coef=0.05,
        clip_ratio_c=3.0,
    )
    loss, met = policy_loss(logp, old, adv, mask, ent, ref_logp=ref, cfg=cfg)
    want = _reference_f64(logp, old, adv, mask, ent, ref, 0.2, 0.05, 3.0, 0.05)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    n = int(mask.sum())  # 26 valid tokens: k = ceil(5.2) = 6
    assert n == 26 and met["tokens/low"].item() == 6 and met["tokens/rest"].item() == n - 6
    # the policy gradient reaches the low tokens only (those inside their clip range)
    low = BottomEntropyRule(cfg).token_groups(ent, mask)["low"]
    lp = logp.clone().requires_grad_()
    policy_loss(lp, old, adv, mask, ent, ref_logp=None, cfg=cfg)[0].backward()
    assert (lp.grad != 0).any() and not ((lp.grad != 0) & ~low).any()


# ------------------------------------------------------------------ the real trainer
def _series(scrape: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    hits = [v for k, v in scrape.get(name, {}).items() if labels.items() <= dict(k).items()]
    assert len(hits) == 1, (name, labels, scrape.get(name))
    return hits[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_trainer_steps_with_the_rule_reach_metrics_and_prometheus(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "demo_cpu.yaml").read_text())
    raw["algorithm"] = {"name": "grpo", "token_rule": {"name": PATH, "fraction": 0.2}}
    raw["warmstart"].update(steps=50, examples=256, cache_dir=str(tmp_path / "cache"))
    raw["data"].update(synthetic_train_size=512, synthetic_eval_size=16)
    raw["train"].update(steps=2, prompts_per_step=8, mini_batch_prompts=8, torch_threads=1,
                        output_dir=str(tmp_path / "out"))  # fmt: skip
    raw["eval"]["every"] = 2  # the run goes on after step 1 while its metrics are scraped
    raw["checkpoint"]["save_every"] = 0
    config = tmp_path / "custom_rule.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "archer_mcore.cli", "train", str(config)],
        cwd=tmp_path,  # the rule is found through PYTHONPATH, not the repository
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    # here, not at module level: the trainer imports this module for the rule
    from services import read_train_and_scrape

    _, err, scrape = read_train_and_scrape(proc)
    assert proc.returncode == 0, err[-4000:]

    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        for key in ("entropy/low", "entropy/rest", "clip/low/low", "clip/high/rest", "kl/low"):
            assert key in r, key
        assert r["tokens/low"] + r["tokens/rest"] == r["tokens/all"] > 0
        # k = max(1, ceil(0.2 N_i)) per micro-batch: a share just above 0.2
        assert 0.2 <= r["share/low"] <= 0.25, r["share/low"]
        assert r["entropy/low"] < r["entropy/rest"]
    assert scrape is not None, "no /metrics scrape after step 1"
    step = int(max(scrape["archer_step"].values()))
    row = rows[step - 1]
    assert _series(scrape, "archer_token_group_ratio", group="low") == pytest.approx(
        row["share/low"]
    )
    assert _series(scrape, "archer_token_entropy_nats", group="rest") == pytest.approx(
        row["entropy/rest"]
    )
    assert _series(scrape, "archer_clip_ratio", bound="low", group="low") == pytest.approx(
        row["clip/low/low"]
    )
    trained = sum(r["tokens/low"] for r in rows[:step])  # a counter: summed over steps
    assert _series(scrape, "archer_group_tokens_total", group="low") == trained
    rejected = _series(scrape, "archer_exporter_rejected_values_total", reason="unknown_key")
    assert rejected == 0, [x for x in err.splitlines() if "metrics: dropped" in x]
