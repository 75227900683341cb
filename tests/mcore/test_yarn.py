"""YaRN rope scaling: read from HF configs as transformers resolves them, mapped to
megatron-core's YarnRotaryEmbedding and back, and megatron's forward equal to
transformers' at positions beyond the original context (fp32, 1e-4)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, hf_logits, save_tiny_hf, tiny_hf_config

from archer_mcore.model.convert import hf_rope_from_mcore, mcore_rope
from archer_mcore.model.hf_config import ModelShape, RopeScaling, shape_from_hf_config

ROPES = {
    "factor_only": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "legacy_type_key": {"type": "yarn", "factor": 2.5, "original_max_position_embeddings": 24},
    "betas_no_truncate": {
        "rope_type": "yarn",
        "factor": 3.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 4.0,
        "beta_slow": 0.25,
        "truncate": False,
    },
    "attention_factor": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "attention_factor": 1.3,
    },
    "mscale_pair": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 8,
        "mscale": 0.7,
        "mscale_all_dim": 0.3,
    },
    "factor_from_lengths": {
        "rope_type": "yarn",
        "factor": None,
        "original_max_position_embeddings": 32,
    },
}


def _hf_yarn(d: dict) -> tuple[torch.Tensor, float]:
    """transformers' own (inv_freq, attention_factor) for a config dict."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = dict(d)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    return ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")


@pytest.mark.parametrize("name", sorted(ROPES))
def test_yarn_config_round_trip_matches_transformers(name):
    """HF dict -> ModelShape -> megatron settings -> HF dict: transformers computes the
    same frequencies and attention factor from the result as from the original."""
    hf = tiny_hf_config("qwen3", rope_scaling=dict(ROPES[name]))
    shape = shape_from_hf_config(hf)
    assert shape.rope_scaling is not None and shape.rope_scaling.rope_type == "yarn"
    rope = mcore_rope(shape)
    assert rope.position_embedding_type == "yarn"
    back = {**hf, "rope_scaling": None, **hf_rope_from_mcore(rope)}
    assert shape_from_hf_config(back) == shape
    freq_a, af_a = _hf_yarn(hf)
    freq_b, af_b = _hf_yarn(back)
    torch.testing.assert_close(freq_b, freq_a, rtol=0, atol=0)
    assert af_b == pytest.approx(af_a, rel=1e-12)
    assert shape.rope_scaling.attention_factor == pytest.approx(af_a, rel=1e-12)
    # megatron's own concentration factor from the attributes we set
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        _yarn_get_concentration_factor,
    )

    a = rope.config_attrs
    got = _yarn_get_concentration_factor(
        a["yarn_rotary_scaling_factor"], a["yarn_mscale"], a["yarn_mscale_all_dim"]
    )
    assert got == pytest.approx(af_a, rel=1e-12)


def test_megatron_yarn_frequencies_match_transformers():
    """megatron's YarnRotaryEmbedding (built from our attributes, on CPU) uses the
    frequencies transformers uses, for a non-truncated ramp with custom betas."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    from archer_mcore.parallel.cpu_compat import cpu_compat

    hf = tiny_hf_config("qwen3", rope_scaling=dict(ROPES["betas_no_truncate"]))
    shape = shape_from_hf_config(hf)
    a = mcore_rope(shape).config_attrs
    with cpu_compat():
        emb = YarnRotaryEmbedding(
            kv_channels=shape.head_dim,
            rotary_base=shape.rope_theta,
            scaling_factor=a["yarn_rotary_scaling_factor"],
            original_max_position_embeddings=a["yarn_original_max_position_embeddings"],
            beta_fast=a["yarn_beta_fast"],
            beta_slow=a["yarn_beta_slow"],
            mscale=a["yarn_mscale"],
            mscale_all_dim=a["yarn_mscale_all_dim"],
            correction_range_round_to_int=a["yarn_correction_range_round_to_int"],
            use_cpu_initialization=True,
        )
        freqs, _ = emb.get_emb(3)
    ref, _ = _hf_yarn(hf)
    torch.testing.assert_close(freqs[1, 0, 0, : shape.head_dim // 2], ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(freqs[2, 0, 0, : shape.head_dim // 2], 2 * ref, rtol=1e-6, atol=0)


def test_rope_parsing_errors_and_limits():
    base = tiny_hf_config("qwen3")
    assert shape_from_hf_config(base).rope_scaling is None
    assert shape_from_hf_config(base).position_limit == 128
    for bad in ("linear", "dynamic", "llama3"):
        with pytest.raises(ValueError, match=bad):
            shape_from_hf_config({**base, "rope_scaling": {"rope_type": bad, "factor": 2.0}})
    with pytest.raises(ValueError, match="factor"):
        shape_from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 0.5}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        shape_from_hf_config({**base, "partial_rotary_factor": 0.5})
    # Qwen3's documented long-context setting: factor 4 over 32768 -> 131072 positions.
    s = shape_from_hf_config(
        {
            **base,
            "max_position_embeddings": 40960,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        }
    )
    assert s.position_limit == 131072
    assert s.rope_scaling.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # a top-level original_max_position_embeddings wins (transformers' rule)
    s2 = shape_from_hf_config(
        {
            **base,
            "original_max_position_embeddings": 64,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 2.0,
                "original_max_position_embeddings": 16,
            },
        }
    )
    assert s2.rope_scaling.original_max_position_embeddings == 64
    # JSON round trip of the shape (what archer convert stores in archer_mcore.json)
    assert ModelShape(**json.loads(json.dumps(s.to_dict()))) == s
    assert isinstance(ModelShape(**s.to_dict()).rope_scaling, RopeScaling)


def test_convert_dirs_keep_yarn(tmp_path):
    """archer convert --to-mcore / --to-hf keeps the rope settings and the weights."""
    from safetensors.torch import load_file

    from archer_mcore.model.convert_dirs import META_FILE, hf_to_mcore_dir, mcore_dir_to_hf

    src = save_tiny_hf(
        "qwen3",
        tmp_path / "hf",
        rope_scaling=dict(ROPES["attention_factor"]),
        max_position_embeddings=64,
    )
    mc = hf_to_mcore_dir(src, tmp_path / "mcore", tp=2, pp=1)
    meta = json.loads((mc / META_FILE).read_text())
    assert ModelShape(**meta["shape"]) == shape_from_hf_config(src)
    back = mcore_dir_to_hf(mc, tmp_path / "back")
    assert shape_from_hf_config(back) == shape_from_hf_config(src)
    a, b = load_file(str(src / "model.safetensors")), {}
    for f in back.glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_megatron_yarn_forward_matches_transformers_beyond_original_limit(tmp_path):
    """48 tokens through models whose YaRN original limit is 16 positions: megatron
    (TP=1 and TP=2) equals transformers' eager fp32 forward to 1e-4, while dropping the
    scaling moves transformers' logits far more than that (so the check can fail)."""
    import yarn_workers

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 48))
    specs = {
        "qwen3": ("qwen3", ROPES["factor_only"], 3),
        "qwen2": ("qwen2", ROPES["betas_no_truncate"] | {"attention_factor": 1.2}, 4),
    }
    models = {}
    for name, (mt, rope, seed) in specs.items():
        d = save_tiny_hf(
            mt, tmp_path / name, seed=seed, rope_scaling=dict(rope), max_position_embeddings=64
        )
        logits = hf_logits(d, ids)
        plain = save_tiny_hf(mt, tmp_path / f"{name}_plain", seed=seed, max_position_embeddings=64)
        assert (hf_logits(plain, ids) - logits).abs().max() > 1e-2
        models[name] = {"dir": str(d), "logits": logits.tolist()}
    result = tmp_path / "yarn_result.json"
    mp.start_processes(
        yarn_workers.entry,
        args=(
            2,
            free_port(),
            "yarn_parity",
            {"input_ids": ids.tolist(), "models": models, "tps": [1, 2]},
            str(result),
        ),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    res = json.loads(result.read_text())
    for tp in (1, 2):
        for name in models:
            r = res[f"tp{tp}/{name}"]
            assert r["rotary"] == "YarnRotaryEmbedding", r
            assert r["ranks"] == tp, r
            assert r["max_abs_diff"] < 1e-4, (tp, name, r)
