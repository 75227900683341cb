"""rollout.fp8 against the servers' quantization at start-up (issue 21, item 4), on the
rules' inputs: /server_info replies shaped as SGLang 0.5.23 answers them
(`quantization` = the --quantization flag, `model_path`, `json_model_override_args`) and
the stand-in server. The real server is tests/sglang_real/test_real_fp8_mismatch.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fake_sglang import FakeSGLangServer

from archer_mcore.config import config_from_dict
from archer_mcore.rollout.fp8_export import quantization_config
from archer_mcore.rollout.sglang_config import build_sglang_engine, expected_server_fields
from archer_mcore.rollout.sglang_servers import check_quantization, server_quantization
from archer_mcore.rollout.types import RolloutError

HF = {"model_type": "qwen3", "vocab_size": 64, "hidden_size": 32}


def checkpoint(tmp_path: Path, quant: dict | None) -> Path:
    d = tmp_path / ("fp8" if quant else "bf16")
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({**HF, **({"quantization_config": quant} if quant else {})})
    )
    return d


def test_the_rule_reads_flag_overrides_and_checkpoint(tmp_path, caplog):
    bf16, fp8 = checkpoint(tmp_path, None), checkpoint(tmp_path, quantization_config("block"))
    tensorwise = tmp_path / "t"
    tensorwise.mkdir()
    (tensorwise / "config.json").write_text(
        json.dumps({**HF, "quantization_config": quantization_config("tensor")})
    )
    ok = [({"quantization": None, "model_path": str(bf16)}, False),
          ({"quantization": None, "model_path": str(fp8)}, True),
          ({"quantization": None, "model_path": str(bf16),
            "json_model_override_args": json.dumps({"quantization_config": quantization_config("block")})}, True)]  # fmt: skip
    for info, fp8_on in ok:
        check_quantization("u", info, "rollout.fp8", fp8_on)
        with pytest.raises(RolloutError, match=f"rollout.fp8 = {str(not fp8_on).lower()}"):
            check_quantization("u", info, "rollout.fp8", not fp8_on)
    # --quantization fp8 on a bf16 checkpoint: online per-tensor FP8, no *_scale_inv
    # parameters: neither setting fits
    online = {"quantization": "fp8", "model_path": str(bf16)}
    assert server_quantization(online).method == "fp8" and server_quantization(online).block is None
    for fp8_on in (True, False):
        with pytest.raises(RolloutError, match="--quantization fp8"):
            check_quantization("u", online, "rollout.fp8", fp8_on)
    with pytest.raises(RolloutError, match="quant_method 'fp8'"):  # per-tensor checkpoint
        check_quantization("u", {"model_path": str(tensorwise)}, "rollout.fp8", True)
    # unknown (hub id, relative or missing path): accepted with a warning naming the key
    for path in ("Qwen/Qwen3-8B", "rel/dir", str(tmp_path / "missing"), None):
        info = {"quantization": None, "model_path": path}
        assert not server_quantization(info).known
        with caplog.at_level(logging.WARNING, logger="archer.rollout"):
            caplog.clear()
            check_quantization("u", info, "rollout.fp8", True)
        assert "rollout.fp8 = True is not checked" in caplog.text


def test_config_expects_the_quantization_of_rollout_fp8(tmp_path):
    bf16 = checkpoint(tmp_path, None)
    fake = FakeSGLangServer(model_path=str(bf16)).start()
    try:

        def cfg(fp8: bool):
            return config_from_dict({
                "train": {"output_dir": str(tmp_path / "out")},
                "rollout": {"engine": "sglang", "mode": "disaggregated", "fp8": fp8,
                            "sglang": {"server_urls": [fake.url], "master_address": "127.0.0.1",
                                       "dtype": "bfloat16", "max_retries": 0}},
            })  # fmt: skip

        assert expected_server_fields(cfg(True).rollout.sglang, fp8=True)["quantization"] == (
            "rollout.fp8", True)  # fmt: skip
        with pytest.raises(RolloutError, match=r"rollout\.fp8 = true") as e:
            build_sglang_engine(cfg(True), HF, tmp_path / "w", device="cpu")
        assert str(bf16 / "config.json") in str(e.value)
        build_sglang_engine(cfg(False), HF, tmp_path / "w2", device="cpu").shutdown()
    finally:
        fake.stop()
