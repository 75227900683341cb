"""rollout.async_steps = 1 against two real SGLang 0.5.23 servers behind the real
sglang-router: `archer train` on the demo config, 4 steps, with a driver that records,
in the trainer process, what each step trained on (every sample's tokens and the weight
version SGLang reported for it, the trainer's old log-probs, the server's log-probs and
the TIS weights the loss used) and the weights sent at every sync.

Checked against independent references: every sample carries a version, none is more
than one update older than the trained policy; the server log-probs each sample's ratio
is corrected by (the TIS denominators) are the log-probs of the weights of the version
the sample carries, recomputed by transformers' own Qwen3 with those weights; the TIS
weights are min(pi_old / pi_rollout, cap), recomputed in float64."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from sglang_harness import RealServers
from test_real_train import DEMO, REPO, _metrics, _overrides, _server_model

from archer_mcore.rollout.hf_model import build_causal_lm

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

CAP = 2.0
DRIVER = r'''
import os, sys, torch
import archer_mcore.train.loop as loop
import archer_mcore.train.update as update
from archer_mcore.rollout.sglang_engine import SGLangEngine

dump = os.environ["ARCHER_ASYNC_DUMP"]
step = {"n": 0}
real_update, real_build, real_tis = SGLangEngine.update_weights, loop.build_batch, update.truncated_is_weights

def update_weights(self, buckets, version=None):
    buckets = [[(n, t.detach().clone()) for n, t in b] for b in buckets]
    torch.save({n: t for b in buckets for n, t in b}, f"{dump}/weights_v{version}.pt")
    return real_update(self, iter(buckets), version=version)

def build_batch(groups, *a, **k):
    step["n"] += 1
    rows = [(list(s.prompt_ids), list(s.token_ids), s.weight_version) for g in groups for s in g.samples]
    torch.save(rows, f"{dump}/samples_{step['n']}.pt")
    return real_build(groups, *a, **k)

def truncated_is_weights(old, rollout, cap, mask):
    w = real_tis(old, rollout, cap, mask)
    torch.save({"old": old, "rollout": rollout, "mask": mask, "w": w}, f"{dump}/tis_{step['n']}.pt")
    return w

SGLangEngine.update_weights = update_weights
loop.build_batch, update.truncated_is_weights = build_batch, truncated_is_weights
from archer_mcore.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _logprobs(model: torch.nn.Module, prompt: list[int], response: list[int]) -> torch.Tensor:
    ids = torch.tensor([[*prompt, *response]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)  # rollout temperature 1.0 (the demo's)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[pos, torch.tensor(response)]


def test_async_train_against_real_servers(tmp_path, kernel_calls):
    from archer_mcore.rollout.sglang_launcher import free_port

    model = _server_model(tmp_path)
    dump = tmp_path / "dump"
    dump.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    rs = RealServers(tmp_path / "logs", kernel_calls)
    extra = ["train.steps=4", "rollout.async_steps=1", f"rollout.tis_cap={CAP}",
             "algorithm.group_filter=none",
             # every update moves the policy (the entropy bonus has a gradient even when
             # every group is all-wrong); a short warm start of its own
             "algorithm.entropy_coef=0.01", "optimizer.lr=5.0e-4",
             "warmstart.steps=50", "warmstart.examples=256", "data.synthetic_train_size=512",
             f"warmstart.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    try:
        rs.start(model, 2, extra=("--load-format", "dummy"))
        rs.start_router()
        cmd = [sys.executable, str(driver), "train", str(DEMO)]
        cmd += [a for o in _overrides(tmp_path, rs, extra) for a in ("-o", o)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(free_port()), "ARCHER_ASYNC_DUMP": str(dump)}  # fmt: skip
        run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        rs.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    models = {}
    for s in range(1, 5):
        samples = torch.load(dump / f"samples_{s}.pt")
        versions = {v for _, _, v in samples}
        # the trained policy is version s-1; step s's batch was generated while step
        # s-1 trained, with version s-2 (step 1: the initial weights, version 0)
        assert versions == {max(0, s - 2)}, (s, versions)
        assert rows[s - 1]["rollout/staleness_max"] == (0.0 if s == 1 else 1.0)
        tis = torch.load(dump / f"tis_{s}.pt")
        mask = tis["mask"].bool()
        x = (tis["old"].double() - tis["rollout"].double()).clamp(max=math.log(CAP))
        want = torch.where(mask, torch.exp(x), torch.zeros_like(x))
        torch.testing.assert_close(tis["w"].double(), want, atol=1e-6, rtol=1e-6)
        diff = (tis["old"] - tis["rollout"]).abs()[mask].mean().item()
        if s == 1:  # same weights on both sides: only fp32 round-off
            assert diff < 1e-5, diff
        else:  # one update apart: there is something to correct
            assert diff > 1e-4, diff
        for b, (prompt, response, v) in enumerate(samples):
            if v not in models:
                models[v] = build_causal_lm(model / "config.json",
                                            torch.load(dump / f"weights_v{v}.pt"))  # fmt: skip
            ref = _logprobs(models[v], prompt, response)
            got = tis["rollout"][b, : len(response)].double()
            torch.testing.assert_close(got, ref, atol=2e-4, rtol=0)  # logprob_check.FP32_ATOL
