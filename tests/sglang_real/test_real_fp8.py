"""FP8 rollout weights against the real SGLang 0.5.23 loader on the CPU.

The FP8 export (the weights and `_scale_inv` tensors an FP8 sync sends, written as a
checkpoint with the block-wise quantization_config) is loaded by a real server. On a
CPU without AMX SGLang's Fp8LinearMethod cannot run (`process_weights_after_loading_
block_quant` asserts AMX support, `sglang/srt/layers/quantization/fp8.py`), and that
assertion comes after every tensor was matched by name, dtype and shape: a server
that reaches it accepted the checkpoint. On a CPU with AMX it serves."""

from __future__ import annotations

import json

import pytest
import torch
from sglang_harness import RealServers

from archer_mcore.model.hf_io import write_hf_checkpoint
from archer_mcore.rollout.fp8_export import quantization_config, quantize_buckets
from archer_mcore.rollout.types import RolloutError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# every linear's output and input a multiple of the 128 block (SGLang refuses others:
# "output_partition_size = 64 is not divisible by weight quantization block_n = 128")
FP8_QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=256,
                 hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 eos_token_id=1, bos_token_id=2, pad_token_id=0, torch_dtype="bfloat16")  # fmt: skip


def test_real_loader_accepts_the_fp8_sync_tensors(tmp_path, kernel_calls):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(FP8_QWEN3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d))
    buckets = [list(model.state_dict().items())]
    sent = [t for b in quantize_buckets(buckets, scheme="block") for t in b]
    names = {n: t for n, t in sent}
    q = names["model.layers.0.mlp.down_proj.weight"]
    assert q.dtype == torch.float8_e4m3fn
    assert names["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 4)  # 256x512
    out = tmp_path / "fp8"
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({**FP8_QWEN3,
                                                  "quantization_config": quantization_config("block")}))  # fmt: skip
    write_hf_checkpoint([sent], out, base)
    rs = RealServers(tmp_path / "logs", kernel_calls)
    try:
        try:
            rs.start(out, 1, deadline_s=400, dtype="bfloat16")
            served = True
        except RolloutError:
            served = False
        log = next((tmp_path / "logs").glob("server_*.log")).read_text()
    finally:
        rs.stop()
    if not served:  # no AMX: it must fail only after loading every tensor
        assert "Fp8LinearMethod on CPU requires that CPU has AMX support" in log, log[-3000:]
        assert "process_weights_after_loading_block_quant" in log
        for bad in ("not divisible", "size mismatch", "KeyError", "shape mismatch"):
            assert bad not in log, bad
