"""One optimizer step of MegatronPolicy equals the same step taken with transformers'
model + the torch loss reference + torch Adam, at TP1 (DP2), TP2, PP2 and PP2 with full
activation recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny_hf, spawn, tiny_hf_config
from safetensors.torch import save_file

from archer_mcore.algo.entropy import entropy_and_logprob
from archer_mcore.algo.losses import policy_loss
from archer_mcore.config import config_from_dict

TEMPERATURE = 0.9
# Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 a gradient entry near 1e-8
# turns fp32 summation-order noise (which legitimately differs between layouts) into
# O(lr) parameter differences. eps = 1e-4 bounds that amplification to lr / eps.
OPTIM = {"lr": 1e-2, "clip_grad": 0.5, "adam_eps": 1e-4, "weight_decay": 0.0}
LOSS = {
    "token_rule": "archer",
    "agg_mode": "seq-mean-token-mean",
    "kl_coef": 0.05,
    "clip_ratio_c": 3.0,
}


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    """4 rows, prompts of 2-4 tokens, responses of 1-6 tokens (one with a hole), right-padded."""
    g = torch.Generator().manual_seed(5)
    prompt = torch.tensor([3, 2, 4, 2])
    resp = torch.tensor([6, 1, 4, 5])
    t, lmax = 11, 6
    ids = torch.randint(1, vocab, (4, t), generator=g)
    mask = torch.arange(lmax).unsqueeze(0) < resp.unsqueeze(1)
    mask[3, 2] = False  # a masked-out token inside a response
    for i in range(4):
        ids[i, prompt[i] + resp[i] :] = 0
    return {"input_ids": ids, "prompt_lengths": prompt, "response_mask": mask}


def _response_logits(model, ids, prompt, lmax) -> torch.Tensor:
    logits = model(ids).logits  # [B, T, V]
    pos = (prompt.unsqueeze(1) + torch.arange(lmax).unsqueeze(0) - 1).clamp(max=ids.shape[1] - 1)
    return logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def _targets(ids, prompt, lmax):
    pos = (prompt.unsqueeze(1) + torch.arange(lmax).unsqueeze(0)).clamp(max=ids.shape[1] - 1)
    return ids.gather(1, pos)


def reference_step(hf_dir, b: dict[str, torch.Tensor]):
    """transformers forward + archer_mcore.algo loss over the whole batch + torch Adam."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    ids, prompt, mask = b["input_ids"], b["prompt_lengths"], b["response_mask"]
    lmax = mask.shape[1]
    tg = _targets(ids, prompt, lmax)
    with torch.no_grad():
        _, lp0 = entropy_and_logprob(_response_logits(model, ids, prompt, lmax), tg, TEMPERATURE)
    g = torch.Generator().manual_seed(6)
    old = torch.where(mask, lp0 + 0.3 * torch.randn(lp0.shape, generator=g), torch.zeros_like(lp0))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.7])
    ent, lp = entropy_and_logprob(_response_logits(model, ids, prompt, lmax), tg, TEMPERATURE)
    loss, _ = policy_loss(
        lp, old, adv, mask, ent, ref_logp=lp0, cfg=config_from_dict({"algorithm": LOSS}).algorithm
    )
    loss.backward()
    params = [p for p in model.parameters()]
    norm = torch.nn.utils.clip_grad_norm_(params, OPTIM["clip_grad"])
    opt = torch.optim.Adam(params, lr=OPTIM["lr"], eps=OPTIM["adam_eps"])
    opt.step()
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return old, adv, float(loss), float(norm), sd


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_one_step_matches_transformers_reference_across_layouts(tmp_path, model_type):
    hf_dir = save_tiny_hf(model_type, tmp_path / "hf", seed=7)
    b = _batch(100)
    old, adv, ref_loss, ref_norm, expected = reference_step(hf_dir, b)
    save_file(expected, str(tmp_path / "expected.safetensors"))
    payload = {
        "hf_dir": str(hf_dir),
        "expected": str(tmp_path / "expected.safetensors"),
        "batch": {
            **{k: v.tolist() for k, v in b.items()},
            "old_logp": old.tolist(),
            "advantages": adv.tolist(),
        },
        "loss": LOSS,
        "optim": OPTIM,
        "temperature": TEMPERATURE,
        "micro_batch_tokens": 20,  # 2 sequences of <= 10 tokens: several micro-batches per rank
        "layouts": [(1, 1, None), (2, 1, None), (1, 2, None), (1, 2, "full")],
        "hf_config": tiny_hf_config(model_type),
    }
    res = spawn("train_step", 2, payload, tmp_path)
    assert ref_norm > OPTIM["clip_grad"]  # clipping is active in this step
    for layout in ("tp1pp1", "tp2pp1", "tp1pp2", "tp1pp2-full"):
        r = res[layout]
        assert r["names"] == len(expected), (layout, r)
        assert r["max_abs_diff"] < 1e-5, (layout, r)
        assert abs(r["metrics"]["loss"] - ref_loss) < 1e-5, (layout, r["metrics"]["loss"], ref_loss)
        assert abs(r["metrics"]["grad_norm"] - ref_norm) < 1e-4 * max(1.0, ref_norm), (
            layout,
            r["metrics"],
        )
    assert res["tp1pp1"]["dp"] == 2 and res["tp2pp1"]["dp"] == 1
    assert res["random_init"] == {"dp": 2, "replica_spread": 0.0}
