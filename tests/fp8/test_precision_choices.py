"""The spec, FP8 recipe and flags that a config gets on each kind of machine."""

from __future__ import annotations

import logging
import warnings

import pytest

from archer_mcore.model import fp8 as fp8mod
from archer_mcore.model.fp8 import choose_precision, warn_once

HOPPER, ADA, AMPERE, BLACKWELL = (9, 0), (8, 9), (8, 0), (10, 0)


@pytest.mark.parametrize(
    ("fp8", "te", "cap", "dist_opt", "expected"),
    [
        # (spec, format, recipe, fp8 param gather, warns)
        ("none", None, None, True, ("local", None, None, False, True)),
        ("none", "2.4.0", HOPPER, True, ("transformer_engine", None, None, False, False)),
        (
            "delayed",
            "1.13.0",
            HOPPER,
            True,
            ("transformer_engine", "hybrid", "delayed", True, False),
        ),
        ("delayed", "2.4.0", ADA, False, ("transformer_engine", "hybrid", "delayed", False, False)),
        (
            "tensorwise",
            "2.2.0",
            HOPPER,
            True,
            ("transformer_engine", "hybrid", "tensorwise", True, False),
        ),
        (
            "tensorwise",
            "2.2.0.dev0+abc",
            HOPPER,
            True,
            ("transformer_engine", "hybrid", "tensorwise", True, False),
        ),
        (
            "tensorwise",
            "2.1.0",
            HOPPER,
            True,
            ("transformer_engine", "hybrid", "delayed", True, True),
        ),
        (
            "blockwise",
            "2.3.0",
            HOPPER,
            True,
            ("transformer_engine", "e4m3", "blockwise", True, False),
        ),
        (
            "blockwise",
            "2.2.1",
            HOPPER,
            True,
            ("transformer_engine", "hybrid", "delayed", True, True),
        ),
        (
            "blockwise",
            "2.5.0",
            BLACKWELL,
            True,
            ("transformer_engine", "hybrid", "delayed", True, True),
        ),
        ("blockwise", "2.5.0", ADA, True, ("transformer_engine", "hybrid", "delayed", True, True)),
        ("delayed", "2.4.0", AMPERE, True, ("transformer_engine", None, None, False, True)),
        ("delayed", "2.4.0", None, True, ("transformer_engine", None, None, False, True)),
        ("tensorwise", None, HOPPER, True, ("local", None, None, False, True)),
    ],
)
def test_choices_table(fp8, te, cap, dist_opt, expected):
    c = choose_precision(fp8, "transformer_engine", dist_opt, te, cap)
    spec, fmt, recipe, gather, warns = expected
    assert (c.spec, c.fp8_format, c.fp8_recipe, c.fp8_param_gather) == (spec, fmt, recipe, gather)
    assert (c.warning is not None) == warns
    assert c.fp8_enabled == (recipe is not None)


def test_local_impl_never_warns_and_fp8_with_local_is_an_error():
    assert choose_precision("none", "local", True, None, None).spec == "local"
    assert choose_precision("none", "local", True, None, None).warning is None
    with pytest.raises(ValueError, match="model.transformer_impl = transformer_engine"):
        choose_precision("delayed", "local", True, "2.4.0", HOPPER)


def test_fallback_warnings_say_what_happened():
    no_te = choose_precision("blockwise", "transformer_engine", True, None, HOPPER)
    assert "not installed" in no_te.warning and "BF16" in no_te.warning
    old_te = choose_precision("blockwise", "transformer_engine", True, "2.2.0", HOPPER)
    assert "2.3.0.dev0" in old_te.warning and "delayed" in old_te.warning


def test_transformer_config_accepts_the_kwargs():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.transformer import TransformerConfig

    for recipe, te in (("delayed", "2.4.0"), ("tensorwise", "2.4.0"), ("blockwise", "2.4.0")):
        c = choose_precision(recipe, "transformer_engine", True, te, HOPPER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tc = TransformerConfig(
                num_layers=2, hidden_size=64, num_attention_heads=4, **c.transformer_config_kwargs()
            )
        assert tc.fp8 == c.fp8_format and str(tc.fp8_recipe).endswith(recipe)
        assert tc.fp8_param is True
        ddp = DistributedDataParallelConfig(use_distributed_optimizer=True, **c.ddp_config_kwargs())
        assert ddp.fp8_param_gather is True
    delayed = choose_precision("delayed", "transformer_engine", True, "2.4.0", HOPPER)
    kw = delayed.transformer_config_kwargs()
    assert kw["fp8_amax_history_len"] == 1024 and kw["fp8_amax_compute_algo"] == "max"
    assert (
        choose_precision(
            "none", "transformer_engine", True, "2.4.0", HOPPER
        ).transformer_config_kwargs()
        == {}
    )


def test_spec_functions_exist_and_local_spec_builds():
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec

    for name in fp8mod.SPEC_FUNCTIONS.values():
        assert callable(getattr(gpt_layer_specs, name))
    spec = choose_precision("none", "local", True, None, None).build_layer_spec(qk_layernorm=True)
    assert isinstance(spec, ModuleSpec)
    from megatron.core.transformer.identity_op import IdentityOp

    attn = spec.submodules.self_attention.submodules
    assert attn.q_layernorm is not IdentityOp and attn.k_layernorm is not IdentityOp
    no_qk = choose_precision("none", "local", True, None, None).build_layer_spec(qk_layernorm=False)
    assert no_qk.submodules.self_attention.submodules.q_layernorm is IdentityOp


def test_choices_for_config_on_this_cpu_machine():
    from archer_mcore.config import config_from_dict

    cfg = config_from_dict({"model": {"transformer_impl": "transformer_engine", "fp8": "delayed"}})
    te, cap = fp8mod.detect_environment()
    c = fp8mod.choices_for_config(cfg)
    assert c == choose_precision("delayed", "transformer_engine", True, te, cap)
    if te is None:
        assert c.spec == "local" and not c.fp8_enabled and c.warning


def test_warning_is_logged_once(caplog):
    fp8mod._WARNED.clear()
    c = choose_precision("tensorwise", "transformer_engine", True, None, HOPPER)
    with caplog.at_level(logging.WARNING, logger="archer_mcore.model.fp8"):
        assert warn_once(c) is True
        assert warn_once(c) is False
        assert warn_once(choose_precision("none", "local", True, None, None)) is False
    assert [r.getMessage() for r in caplog.records] == [c.warning]
