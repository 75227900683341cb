"""FP8 from one place: for every preset in configs/ and every `model.fp8` value, the
TransformerConfig and DistributedDataParallelConfig that the builder hands megatron
carry the recipe `choose_precision` chose, and megatron-core accepts them. Transformer
Engine is absent here, so only the config objects are built (on a stated Hopper + TE
2.8 machine, and on this machine)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from archer_mcore.config import ModelConfig, load_config
from archer_mcore.model.build import ddp_config, resolve_build_choices, transformer_config
from archer_mcore.model.fp8 import choose_precision
from archer_mcore.plan import shape_from_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
FP8_VALUES = typing.get_args(typing.get_type_hints(ModelConfig)["fp8"])
HOPPER_TE = ("2.8.0", (9, 0))


def test_every_fp8_value_is_covered():
    assert set(FP8_VALUES) == {"none", "delayed", "tensorwise", "blockwise"}
    assert len(PRESETS) >= 10


@pytest.mark.parametrize("fp8", FP8_VALUES)
@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_megatron_receives_the_chosen_recipe(preset, fp8, monkeypatch):
    import megatron.core.utils as mcore_utils
    from packaging.version import Version

    cfg = load_config(preset, [f"model.fp8={fp8}"])
    shape = shape_from_config(cfg, preset)
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    for te_version, capability in (HOPPER_TE, (None, None)):
        # megatron-core 0.16.1 asks the installed TE's version when an MoE config asks
        # for FP8 (TransformerConfig.__post_init__: "Only transformer-engine>=1.7.0
        # supports MoE FP8 training"); TE is absent here, so it reads the stated one
        monkeypatch.setattr(mcore_utils, "_te_version", te_version and Version(te_version))
        if fp8 != "none" and cfg.model.transformer_impl == "local":
            with pytest.raises(ValueError, match="model.transformer_impl"):
                resolve_build_choices(cfg.model, p, te_version, capability, cuda=True)
            continue
        choices = resolve_build_choices(cfg.model, p, te_version, capability, cuda=True)
        expected = choose_precision(
            fp8, cfg.model.transformer_impl, p.use_distributed_optimizer, te_version, capability
        )
        assert choices.precision == expected
        tc = transformer_config(shape, cfg.model, choices, tp=tp, pp=pp)  # megatron validates it
        ddp = ddp_config(choices, p)
        assert tc.sequence_parallel is (p.sequence_parallel and tp > 1)
        assert ddp.use_distributed_optimizer is p.use_distributed_optimizer
        if expected.fp8_enabled:
            assert te_version is not None and fp8 != "none"
            assert tc.fp8 == expected.fp8_format and str(tc.fp8_recipe) == expected.fp8_recipe
            assert tc.fp8_param is expected.fp8_param_gather
            assert ddp.fp8_param_gather is expected.fp8_param_gather
            assert expected.fp8_param_gather is p.use_distributed_optimizer
            sp = tp if tc.sequence_parallel else 1
            assert choices.seq_multiple == 16 * sp  # TE FP8 GEMMs: tokens % 16 == 0
        else:
            assert tc.fp8 is None and ddp.fp8_param_gather is False
            assert choices.seq_multiple == (tp if tc.sequence_parallel else 1)
        if fp8 == "delayed" and expected.fp8_enabled:
            assert (tc.fp8_amax_history_len, tc.fp8_amax_compute_algo) == (1024, "max")
