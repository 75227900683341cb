"""rollout.fp8 against the quantization of a real SGLang 0.5.23 server (issue 21, item 4).

What the real server reports (measured here, and read in its source): GET /server_info
carries the resolved server args, `quantization` among them, which is the
--quantization flag only: for a Qwen3 FP8 checkpoint it stays null (0.5.23
`configs/model_config.py` ModelConfig._verify_quantization takes the checkpoint's
quant_method into the *model* config, not into server_args; `prepare_server_args` on an
FP8 config.json resolves `quantization` to None). /model_info has `model_path` and no
quantization. So the engine reads the checkpoint's config.json under /server_info
`model_path` (sglang_servers.server_quantization).

A bf16 server with rollout.fp8: true must be refused at start, naming the key; without
the check its first FP8 sync fails inside SGLang's loader with a KeyError (shown here
too). An FP8 server cannot serve on a CPU without AMX (test_real_fp8.py), so the FP8
server's side is the real bf16 server's /server_info with the `model_path` an FP8
server reports: a checkpoint written by the project's FP8 export."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sglang_harness import TINY_QWEN3, RealServers

from archer_mcore.config import config_from_dict
from archer_mcore.rollout.fp8_export import quantization_config
from archer_mcore.rollout.http_client import ClientConfig
from archer_mcore.rollout.sglang_config import build_sglang_engine
from archer_mcore.rollout.sglang_engine import SGLangEngine
from archer_mcore.rollout.sglang_protocol import WeightSyncConfig
from archer_mcore.rollout.sglang_servers import check_quantization, server_quantization
from archer_mcore.rollout.types import RolloutError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CLIENT = ClientConfig(max_concurrency=4, request_timeout_s=120.0, max_retries=0)
BF16_QWEN3 = {**TINY_QWEN3, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory: pytest.TempPathFactory,
                kernel_calls: Path) -> Iterator[RealServers]:  # fmt: skip
    """One real bf16 server (random weights: --load-format dummy, as colocated launches)
    from a config.json without quantization_config."""
    root = tmp_path_factory.mktemp("fp8_mismatch")
    model = root / "bf16_model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(BF16_QWEN3, indent=1))
    rs = RealServers(root / "logs", kernel_calls)
    rs.model_dir = model  # type: ignore[attr-defined]
    try:
        rs.start(model, 1, dtype="bfloat16", load_format="dummy")
        yield rs
    finally:
        rs.stop()


def _cfg(tmp_path: Path, url: str, fp8: bool) -> Any:
    """A disaggregated config naming the real server (its dtype and memory fraction)."""
    from sglang_harness import CPU_MEM_FRACTION

    return config_from_dict({
        "train": {"output_dir": str(tmp_path / "out")},
        "rollout": {"engine": "sglang", "mode": "disaggregated", "fp8": fp8,
                    "sglang": {"server_urls": [url], "master_address": "127.0.0.1",
                               "dtype": "bfloat16", "mem_fraction_static": CPU_MEM_FRACTION,
                               "max_retries": 0, "request_timeout_s": 120.0}},
    })  # fmt: skip


def test_bf16_server_with_rollout_fp8_true_is_refused_at_start(bf16_server, tmp_path):
    url = bf16_server.urls[0]
    info = httpx2.get(url + "/server_info", timeout=60, trust_env=False).json()
    # what 0.5.23 reports: no --quantization, the checkpoint it loaded by path only
    assert info["quantization"] is None and info["model_path"] == str(bf16_server.model_dir)
    minfo = httpx2.get(url + "/model_info", timeout=60, trust_env=False).json()
    assert not any("quant" in k for k in minfo), minfo
    with pytest.raises(RolloutError) as e:
        build_sglang_engine(_cfg(tmp_path, url, fp8=True), BF16_QWEN3, tmp_path / "w", device="cpu")
    msg = str(e.value)
    assert "rollout.fp8 = true" in msg and url in msg, msg
    assert "quantization = None" in msg and str(bf16_server.model_dir / "config.json") in msg, msg

    # the same server with rollout.fp8: false starts
    engine = build_sglang_engine(_cfg(tmp_path, url, fp8=False), BF16_QWEN3, tmp_path / "w2",
                                 device="cpu")  # fmt: skip
    try:
        assert engine.server_info[url]["quantization"] is None
    finally:
        engine.shutdown()


def test_fp8_checkpoint_as_the_real_server_reports_it(bf16_server, tmp_path):
    """The FP8 server's /server_info: the real reply with the model_path of a block-wise
    FP8 checkpoint (quantization stays None, see the module docstring). rollout.fp8:
    false is refused naming both settings; true passes."""
    url = bf16_server.urls[0]
    info = httpx2.get(url + "/server_info", timeout=60, trust_env=False).json()
    ckpt = tmp_path / "fp8_model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({**BF16_QWEN3,
                                                  "quantization_config": quantization_config("block")}))  # fmt: skip
    fp8_info = {**info, "model_path": str(ckpt)}
    q = server_quantization(fp8_info)
    assert (q.method, q.block, q.known) == ("fp8", (128, 128), True)
    with pytest.raises(RolloutError) as e:
        check_quantization(url, fp8_info, "rollout.fp8", fp8=False)
    msg = str(e.value)
    assert "quantization = 'fp8'" in msg and "rollout.fp8 = false" in msg, msg
    assert str(ckpt / "config.json") in msg and "weight_block_size [128, 128]" in msg, msg
    check_quantization(url, fp8_info, "rollout.fp8", fp8=True)
    # the real bf16 reply itself: the mirror image
    check_quantization(url, info, "rollout.fp8", fp8=False)
    with pytest.raises(RolloutError, match="rollout.fp8 = true"):
        check_quantization(url, info, "rollout.fp8", fp8=True)


def test_without_the_check_the_first_fp8_sync_fails_in_sglangs_loader(bf16_server):
    """What the start-up check prevents: the engine as before it (no quantization
    field expected) starts, and the first FP8 sync (e4m3 + *_scale_inv) raises a KeyError
    on a scale name in the bf16 server's loader, which takes the whole server down (the
    scheduler exits). Last in this module for that reason."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(BF16_QWEN3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    buckets = [list(model.state_dict().items())]
    engine = SGLangEngine(bf16_server.urls, client=CLIENT,
                          weight_sync=WeightSyncConfig(mode="tensor", fp8=True, timeout_s=120))  # fmt: skip
    try:
        with pytest.raises(RolloutError) as e:
            engine.update_weights(buckets, version=1)
    finally:
        engine.shutdown()
    log = next((bf16_server.log_dir).glob("server_*.log")).read_text()
    assert re.search(r"KeyError: 'model\.layers\.\d+\.\S+_scale_inv'", log), log[-3000:]
    assert "update_weights" in str(e.value) or "end_weight_update" in str(e.value), str(e.value)
