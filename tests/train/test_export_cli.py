"""`archer export CONFIG --checkpoint DIR --out HF_DIR`: the trained policy as an HF
checkpoint. Reference: transformers' own Qwen3 loaded from the exported files must give
the log-probs the project's Megatron policy gives with the checkpoint loaded (computed in
a separate process). A real SGLang server loading such an export is in
tests/cluster/test_rehearsal.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PROMPT, RESPONSE = [5, 17, 9, 30, 11], [12, 40, 7, 7, 21, 3]

# The policy of the config with the checkpoint loaded, in a process of its own: its
# log p(response token | prefix) as JSON on stdout.
POLICY_LOGPROBS = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from archer_mcore.actor.policy import MegatronPolicy
from archer_mcore.config import load_config
from archer_mcore.data.prepare import build_tokenizer
from archer_mcore.parallel.distributed import single_process_rendezvous
from archer_mcore.train.components import _policy_config, hf_config_dict
from logprob_check import policy_logprobs
cfg = load_config(sys.argv[2], json.loads(sys.argv[3]))
single_process_rendezvous()
tok = build_tokenizer(cfg, Path(cfg.warmstart.cache_dir))
policy = MegatronPolicy.from_hf(hf_config_dict(cfg, tok), _policy_config(cfg))
policy.load_checkpoint(Path(sys.argv[4]))
print(json.dumps(policy_logprobs(policy, [json.loads(sys.argv[5])], [json.loads(sys.argv[6])])[0]))
"""


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_export_loads_in_transformers_with_the_policys_logprobs(
    archer, helpers, reference_run, tmp_path
):
    out = tmp_path / "hf"
    ckpts = reference_run / "checkpoints"
    proc = archer.run("export", list(helpers.REFERENCE), "--checkpoint", str(ckpts),
                      "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"export: {ckpts / f'step_{helpers.REFERENCE_STEPS:08d}'} -> {out}" in proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors" in names
    assert "tokenizer.json" in names or "tokenizer_config.json" in names, names

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + RESPONSE])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    hf = [float(logp[len(PROMPT) + i - 1, t]) for i, t in enumerate(RESPONSE)]
    assert AutoTokenizer.from_pretrained(out).pad_token_id is not None

    overrides = [f"warmstart.cache_dir={archer.cache}", *helpers.REFERENCE]
    step = ckpts / f"step_{helpers.REFERENCE_STEPS:08d}"
    ref = subprocess.run(
        [sys.executable, "-c", POLICY_LOGPROBS, str(REPO / "tests" / "sglang_real"),
         str(helpers.DEMO_CONFIG), json.dumps(overrides), str(step),
         json.dumps(PROMPT), json.dumps(RESPONSE)],
        cwd=REPO, env=helpers.child_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ref.returncode == 0, ref.stderr[-4000:]
    policy = json.loads(ref.stdout.strip().splitlines()[-1])
    assert max(abs(a - b) for a, b in zip(hf, policy)) < 2e-4, (hf, policy)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_export_refuses_an_existing_out_and_a_missing_checkpoint(
    archer, helpers, reference_run, tmp_path
):
    taken = tmp_path / "taken"
    taken.mkdir()
    ckpts = str(reference_run / "checkpoints")
    proc = archer.run("export", list(helpers.REFERENCE), "--checkpoint", ckpts,
                      "--out", str(taken))  # fmt: skip
    assert proc.returncode == 2 and f"--out: {taken} already exists" in proc.stderr, proc.stderr
    assert list(taken.iterdir()) == []  # nothing written into it
    proc = archer.run("export", list(helpers.REFERENCE), "--checkpoint",
                      str(tmp_path / "nope"), "--out", str(tmp_path / "hf"))  # fmt: skip
    assert proc.returncode == 2 and "--checkpoint:" in proc.stderr, proc.stderr
    assert not (tmp_path / "hf").exists()
