"""The flat metric keys the trainer emits per step, and the Prometheus series each feeds.

The trainer reports one `dict[str, float]` per step (`MetricsExporter.record_step`).
This module is the single catalogue of the accepted keys; docs/metrics.md shows the
same table. Patterns expand over:

- `<group>`: token groups `knowledge`, `reasoning` (Archer's split), `forking`, `other`
  (the forking rule's top-rho / remaining tokens) and `all`, and any group a token rule
  declares (`TokenRule.groups`, a name matching `config.algorithm.GROUP_NAME`);
- `<bound>`: clip bounds `low`, `high` (the PPO clip range) and `dual` (dual clip, A < 0);
- `<phase>`: step phases `rollout`, `reward`, `logprobs`, `update`, `sync`, `eval`,
  `checkpoint`, `step` (`step` = the whole step, wall clock);
- `<term>`: loss terms `pg`, `kl`, `entropy`;
- `<k>`: any positive integer (pass@k).
- `<layer>`: a MoE layer's number, 1-based as megatron numbers it (actor/moe_load.py).

The key `step` is ignored (the step number is record_step's argument).

Kinds: `gauge` sets the value (NaN and inf pass through, so alerts can see them);
`counter` adds the value, which is this step's increment (must be finite, >= 0);
`histogram` observes the value once per step (must be finite); `gauge+histogram` does
both.
"""

from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass, field
from typing import Literal

from archer_mcore.config.algorithm import GROUP_NAME

TOKEN_GROUPS: tuple[str, ...] = ("knowledge", "reasoning", "forking", "other", "all")
CLIP_BOUNDS: tuple[str, ...] = ("low", "high", "dual")
#: Key prefixes of what the machine measures (phase seconds, token rates, idle and
#: overlap shares): two runs that compute the same thing differ there and nowhere else.
WALL_CLOCK_PREFIXES: tuple[str, ...] = ("time/", "throughput/", "overlap/")
PHASES: tuple[str, ...] = (
    "rollout",
    "reward",
    "logprobs",
    "update",
    "sync",
    "eval",
    "checkpoint",
    "step",
)
SHARE_GROUPS: tuple[str, ...] = TOKEN_GROUPS
LOSS_TERMS: tuple[str, ...] = ("pg", "kl", "entropy")
IGNORED_KEYS: frozenset[str] = frozenset({"step"})

Kind = Literal["gauge", "counter", "histogram", "gauge+histogram"]


@dataclass(frozen=True)
class KeySpec:
    """One flat key pattern and where its value goes."""

    pattern: str  # e.g. "clip/<bound>/<group>"
    kind: Kind
    metric: str  # Prometheus name (without _total / _bucket suffixes)
    _: KW_ONLY
    unit: str
    description: str
    histogram: str = ""  # for gauge+histogram: the histogram's name
    labels: tuple[str, ...] = field(default=())  # pattern placeholders -> label names
    group_values: tuple[str, ...] = ()  # values of <group> when not TOKEN_GROUPS


KEY_SPECS: tuple[KeySpec, ...] = (
    KeySpec(
        "reward/mean",
        "gauge+histogram",
        "archer_reward_mean",
        unit="reward",
        description="mean sequence reward over the step's responses (after overlong shaping)",
        histogram="archer_step_reward",
    ),
    KeySpec(
        "reward/std",
        "gauge",
        "archer_reward_std",
        unit="reward",
        description="standard deviation of the step's rewards",
    ),
    KeySpec(
        "reward/accuracy",
        "gauge+histogram",
        "archer_accuracy_ratio",
        unit="ratio 0-1",
        description="share of responses the verifier marked correct",
        histogram="archer_step_accuracy_ratio",
    ),
    KeySpec(
        "reward/failures",
        "counter",
        "archer_reward_failures",
        unit="responses",
        description="responses whose reward computation failed (timeout, crash) this step",
    ),
    KeySpec(
        "entropy/<group>",
        "gauge",
        "archer_token_entropy_nats",
        unit="nats",
        description="mean per-token entropy of the group's response tokens",
        labels=("group",),
    ),
    KeySpec(
        "forking/share",
        "gauge",
        "archer_forking_token_ratio",
        unit="ratio 0-1",
        description="share of valid response tokens selected as high-entropy (forking / reasoning)",
    ),
    KeySpec(
        "clip/<bound>/<group>",
        "gauge",
        "archer_clip_ratio",
        unit="ratio 0-1",
        description="share of the group's tokens whose ratio was clipped at the bound",
        labels=("bound", "group"),
    ),
    KeySpec(
        "kl/<group>",
        "gauge",
        "archer_kl_nats",
        unit="nats",
        description="mean KL estimate to the reference policy over the group's tokens",
        labels=("group",),
    ),
    KeySpec(
        "response/length_mean",
        "gauge+histogram",
        "archer_response_length_tokens",
        unit="tokens",
        description="mean response length",
        histogram="archer_step_response_length_tokens",
    ),
    KeySpec(
        "response/repetition",
        "gauge",
        "archer_response_repetition_ratio",
        unit="ratio 0-1",
        description="mean 4-gram repetition rate of the responses (ngram_repetition_rate)",
    ),
    KeySpec(
        "throughput/rollout_tokens_per_s",
        "gauge",
        "archer_throughput_tokens_per_second",
        unit="tokens/s",
        description="generated tokens per second of rollout wall time",
        labels=("phase=rollout",),
    ),
    KeySpec(
        "throughput/train_tokens_per_s",
        "gauge",
        "archer_throughput_tokens_per_second",
        unit="tokens/s",
        description="trained tokens per second of update wall time",
        labels=("phase=train",),
    ),
    KeySpec(
        "throughput/rollout_tokens",
        "counter",
        "archer_tokens",
        unit="tokens",
        description="tokens generated this step",
        labels=("phase=rollout",),
    ),
    KeySpec(
        "throughput/train_tokens",
        "counter",
        "archer_tokens",
        unit="tokens",
        description="tokens trained on this step",
        labels=("phase=train",),
    ),
    KeySpec(
        "time/<phase>",
        "histogram",
        "archer_phase_duration_seconds",
        unit="seconds",
        description="wall time of the phase this step",
        labels=("phase",),
    ),
    KeySpec(
        "sync/bytes",
        "counter",
        "archer_weight_sync_bytes",
        unit="bytes",
        description="bytes of weights sent to the rollout engine this step",
    ),
    KeySpec(
        "sampling/drop_rate",
        "gauge",
        "archer_dynamic_sampling_drop_ratio",
        unit="ratio 0-1",
        description="share of generated prompt groups dropped by dynamic sampling / group filter",
    ),
    KeySpec(
        "train/skipped_steps",
        "counter",
        "archer_skipped_steps",
        unit="steps",
        description="1 when this step's update was skipped (non-finite loss or grad), else 0",
    ),
    KeySpec(
        "train/loss", "gauge", "archer_loss", unit="loss", description="policy loss of the step"
    ),
    KeySpec(
        "train/grad_norm",
        "gauge",
        "archer_grad_norm",
        unit="norm",
        description="global gradient norm before clipping",
    ),
    KeySpec(
        "train/lr", "gauge", "archer_learning_rate", unit="1/step", description="learning rate"
    ),
    KeySpec(
        "train/update_skipped",
        "gauge",
        "archer_update_skipped",
        unit="0/1",
        description="1 when the last step's update was skipped, else 0",
    ),
    KeySpec(
        "loss/<term>",
        "gauge",
        "archer_loss_term",
        unit="loss",
        description="policy-gradient, KL and entropy terms of the loss",
        labels=("term",),
    ),
    KeySpec(
        "share/<group>",
        "gauge",
        "archer_token_group_ratio",
        unit="ratio 0-1",
        description="share of valid response tokens in the group",
        labels=("group",),
        group_values=SHARE_GROUPS,
    ),
    KeySpec(
        "tokens/<group>",
        "counter",
        "archer_group_tokens",
        unit="tokens",
        description="valid response tokens of the group trained on this step",
        labels=("group",),
        group_values=SHARE_GROUPS,
    ),
    KeySpec(
        "response/length_max",
        "gauge",
        "archer_response_length_max_tokens",
        unit="tokens",
        description="longest response of the step",
    ),
    KeySpec(
        "response/clip_ratio",
        "gauge",
        "archer_response_truncated_ratio",
        unit="ratio 0-1",
        description="share of responses cut at max_new_tokens",
    ),
    KeySpec(
        "rollout/logprob_abs_diff",
        "gauge",
        "archer_rollout_logprob_abs_diff_nats",
        unit="nats",
        description="mean |log p_train - log p_rollout| over response tokens (engine mismatch)",
    ),
    KeySpec(
        "moe/layer/<layer>/load_max_over_mean",
        "gauge",
        "archer_moe_expert_load_max_over_mean",
        unit="ratio",
        description="MoE layer's most loaded expert's tokens / the mean over its experts in "
        "the step's training forwards (1 = balanced)",
        labels=("layer",),
    ),
    KeySpec(
        "moe/load_max_over_mean",
        "gauge",
        "archer_moe_expert_load_max_over_mean_worst",
        unit="ratio",
        description="the largest per-layer max/mean expert load of the step (MoE)",
    ),
    KeySpec(
        "moe/tokens_dropped_fraction",
        "gauge",
        "archer_moe_tokens_dropped_fraction",
        unit="fraction",
        description="dropped token-to-expert assignments / (tokens x top-k) in the step's "
        "training forwards (0 with dropless routing, the trainer's)",
    ),
    KeySpec(
        "sampling/generation_batches",
        "gauge",
        "archer_dynamic_sampling_generation_batches",
        unit="batches",
        description="generation batches dynamic sampling needed to fill the step",
    ),
    KeySpec(
        "rollout/mismatch_kl_k3",
        "gauge",
        "archer_rollout_mismatch_kl_nats",
        unit="nats",
        description="k3 estimate of KL(rollout || trainer) over response tokens (engine mismatch)",
    ),
    KeySpec(
        "rollout/tis_weight_mean",
        "gauge",
        "archer_rollout_tis_weight_mean",
        unit="ratio",
        description="mean truncated importance-sampling weight min(pi_train / pi_rollout, cap)",
    ),
    KeySpec(
        "rollout/tis_clipped_fraction",
        "gauge",
        "archer_rollout_tis_clipped_ratio",
        unit="ratio 0-1",
        description="share of response tokens whose importance weight hit the TIS cap",
    ),
    KeySpec(
        "rollout/staleness_mean",
        "gauge",
        "archer_rollout_staleness_versions",
        unit="versions",
        description="mean policy versions between a trained sample's generating weights and the trained policy (0 sync, <= 1 async)",
    ),
    KeySpec(
        "rollout/staleness_max",
        "gauge",
        "archer_rollout_staleness_max_versions",
        unit="versions",
        description="largest staleness of the step's trained samples (rollout.async_steps bounds it)",
    ),
    KeySpec(
        "overlap/trainer_idle_s",
        "gauge",
        "archer_idle_seconds",
        unit="seconds",
        description="seconds of the step the trainer waited for rollouts (generation, scoring)",
        labels=("side=trainer",),
    ),
    KeySpec(
        "overlap/rollout_idle_s",
        "gauge",
        "archer_idle_seconds",
        unit="seconds",
        description="seconds of the step the rollout side neither generated nor scored a training batch",
        labels=("side=rollout",),
    ),
    KeySpec(
        "overlap/trainer_idle_fraction",
        "gauge",
        "archer_idle_ratio",
        unit="ratio 0-1",
        description="trainer idle seconds / step wall time",
        labels=("side=trainer",),
    ),
    KeySpec(
        "overlap/rollout_idle_fraction",
        "gauge",
        "archer_idle_ratio",
        unit="ratio 0-1",
        description="rollout idle seconds / step wall time",
        labels=("side=rollout",),
    ),
    KeySpec(
        "overlap/fraction",
        "gauge",
        "archer_rollout_overlap_ratio",
        unit="ratio 0-1",
        description="share of the step's rollout work (generation + scoring) done while the trainer worked (0 with rollout.async_steps 0)",
    ),
    KeySpec(
        "reward/accuracy_trained",
        "gauge",
        "archer_reward_accuracy_trained_ratio",
        unit="ratio 0-1",
        description="accuracy of the groups kept for the update (after the group filter)",
    ),
    KeySpec(
        "reward/graded_fraction",
        "gauge",
        "archer_reward_graded_ratio",
        unit="ratio 0-1",
        description="share of the step's responses scored by a graded reward kind (logged only when > 0)",
    ),
    KeySpec(
        "reward/score_mean",
        "gauge",
        "archer_reward_score_mean",
        unit="score 0-1",
        description="mean graded score of the step's graded responses (logged only with graded kinds)",
    ),
    KeySpec(
        "reward/score_std",
        "gauge",
        "archer_reward_score_std",
        unit="score 0-1",
        description="population std of the step's graded scores (logged only with graded kinds)",
    ),
    KeySpec(
        "eval/accuracy",
        "gauge",
        "archer_eval_accuracy_ratio",
        unit="ratio 0-1",
        description="avg@k accuracy of the last periodic evaluation",
    ),
    KeySpec(
        "eval/pass@<k>",
        "gauge",
        "archer_eval_pass_ratio",
        unit="ratio 0-1",
        description="unbiased pass@k of the last periodic evaluation (k = 1, 4, 16 up to n, and n)",
        labels=("k",),
    ),
    KeySpec(
        "data/rows_read",
        "gauge",
        "archer_data_rows_read",
        unit="rows",
        description="training-data rows read at start-up (all data.train_files)",
    ),
    KeySpec(
        "data/kept",
        "gauge",
        "archer_data_rows_kept",
        unit="rows",
        description="training-data rows kept as prompts",
    ),
    KeySpec(
        "data/too_long",
        "gauge",
        "archer_data_rows_too_long",
        unit="rows",
        description="training-data rows dropped for exceeding data.max_prompt_length",
    ),
    KeySpec(
        "data/malformed",
        "gauge",
        "archer_data_rows_malformed",
        unit="rows",
        description="training-data rows dropped as malformed (bad JSON or UTF-8, schema, object answers)",
    ),
)


_PLACEHOLDER_VALUES: dict[str, tuple[str, ...] | None] = {
    "group": TOKEN_GROUPS,
    "bound": CLIP_BOUNDS,
    "phase": PHASES,
    "term": LOSS_TERMS,
    "k": None,  # open-ended: matched by regex (digits)
    "layer": None,  # open-ended: a MoE layer's 1-based number
}


def _values(spec: KeySpec, name: str) -> tuple[str, ...] | None:
    if name == "group" and spec.group_values:
        return spec.group_values
    return _PLACEHOLDER_VALUES[name]


def expand_keys() -> dict[str, tuple[KeySpec, dict[str, str]]]:
    """Every concrete accepted key -> (its spec, the label values it sets); specs with
    an open-ended placeholder (<k>) are left to `resolve_key`."""
    out: dict[str, tuple[KeySpec, dict[str, str]]] = {}
    for spec in KEY_SPECS:
        fixed = dict(lab.split("=", 1) for lab in spec.labels if "=" in lab)
        free = [lab for lab in spec.labels if "=" not in lab]
        if any(_values(spec, name) is None for name in free):
            continue
        combos: list[dict[str, str]] = [{}]
        for name in free:
            combos = [c | {name: v} for c in combos for v in _values(spec, name) or ()]
        for combo in combos:
            key = spec.pattern
            for name, value in combo.items():
                key = key.replace(f"<{name}>", value)
            out[key] = (spec, fixed | combo)
    return out


ACCEPTED_KEYS: dict[str, tuple[KeySpec, dict[str, str]]] = expand_keys()


def _open_regex(spec: KeySpec) -> re.Pattern[str]:
    """Regex of a pattern with open-ended placeholders: positive integers (<k>) and the
    names of token groups (<group>: any token rule's, GROUP_NAME); the others match
    their listed values."""
    parts = re.split(r"<(\w+)>", spec.pattern)  # literal, name, literal, name, ...
    out = []
    for i, p in enumerate(parts):
        if i % 2 == 0:
            out.append(re.escape(p))
        elif p == "group":
            out.append(f"(?P<group>{GROUP_NAME.pattern})")
        elif _values(spec, p) is None:
            out.append(f"(?P<{p}>[1-9][0-9]*)")
        else:
            out.append(f"(?P<{p}>{'|'.join(map(re.escape, _values(spec, p) or ()))})")
    return re.compile("".join(out))


_OPEN_SPECS: tuple[tuple[re.Pattern[str], KeySpec], ...] = tuple(
    (_open_regex(spec), spec)
    for spec in KEY_SPECS
    if any(_values(spec, lab) is None or lab == "group" for lab in spec.labels if "=" not in lab)
)


def resolve_key(key: str) -> tuple[KeySpec, dict[str, str]] | None:
    """(spec, label values) for an accepted key (a custom token rule's groups
    included), else None."""
    hit = ACCEPTED_KEYS.get(key)
    if hit is not None:
        return hit
    for regex, spec in _OPEN_SPECS:
        m = regex.fullmatch(key)
        if m:
            return spec, dict(m.groupdict())
    return None
