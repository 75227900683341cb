"""The local (in-process transformers) rollout engine with a Qwen3-MoE policy (issue
23): the trainer's per-expert checkpoint names load into transformers 5.25's fused
expert tensors, and the engine then computes what transformers' own loader
(`from_pretrained`, which fuses the experts itself) computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from archer_mcore.rollout.hf_model import build_causal_lm, load_named_tensors, parameter_names
from archer_mcore.rollout.local_engine import LocalEngine
from archer_mcore.rollout.types import RolloutError

MOE = dict(
    model_type="qwen3_moe",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=24,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _saved_moe(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random tiny Qwen3MoeForCausalLM saved by transformers (per-expert names on
    disk), the router at std 1 so that tokens pick different experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**MOE)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path)
    sd = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        sd.update(load_file(f))
    return tmp_path, sd


def test_checkpoint_names_load_into_fused_experts(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, sd = _saved_moe(tmp_path)
    per_expert = [k for k in sd if ".mlp.experts." in k]
    # the checkpoint holds per-expert names: 2 layers x 4 experts x gate/up/down
    assert len(per_expert) == 2 * 4 * 3
    engine = LocalEngine(dict(MOE), seed=11, pad_token_id=0, num_threads=1)
    assert parameter_names(engine.model) == set(sd)
    # a weight update of the checkpoint's tensors, in 3 buckets, covers every parameter
    items = sorted(sd.items())
    engine.update_weights([items[0::3], items[1::3], items[2::3]])

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 9, 17, 3, 44, 2, 60, 31]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = engine.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # expert 1's up rows of layer 0 went into rows [f, 2f) of expert 1's fused slot
    fused = engine.model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.equal(fused[1, 24:], sd["model.layers.0.mlp.experts.1.up_proj.weight"])


def test_moe_update_errors_name_the_tensor(tmp_path: Path) -> None:
    _, sd = _saved_moe(tmp_path)
    model = build_causal_lm(dict(MOE), state_dict=sd)
    bad = "model.layers.0.mlp.experts.4.gate_proj.weight"  # only experts 0..3
    with pytest.raises(RolloutError, match=r"experts\.4\.gate_proj"):
        load_named_tensors(model, [[(bad, torch.zeros(24, 32))]])
    wrong = "model.layers.1.mlp.experts.2.down_proj.weight"
    with pytest.raises(RolloutError, match=r"experts\.2\.down_proj.*\(24, 32\).*\(32, 24\)"):
        load_named_tensors(model, [[(wrong, torch.zeros(24, 32))]])
    partial = {k: v for k, v in sd.items() if "experts.3.up_proj" not in k}
    with pytest.raises(RolloutError, match=r"left 2 parameters unset.*experts\.3\.up_proj"):
        load_named_tensors(model, [list(partial.items())], require_all=True)
