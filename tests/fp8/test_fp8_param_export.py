"""The HF export and import of a megatron model whose linear weights are FP8 parameter
tensors (issue 21, item 5), at TP = 1 and 2 on two gloo processes.

With model.fp8 and the distributed optimizer megatron holds the linear weights as
Transformer Engine quantized tensors; TE is not installed here, so they are
`te_standin.StandInFloat8Tensor` (TE 2.x QuantizedTensor's interface; see that module
for what it mimics and what not), registered where `model.fp8.te_quantized_types` puts
TE's class. The export must gather the dequantized values (a wrapper tensor has no
storage for all_gather to send; at TP 1 nothing is gathered and `.to(dtype)` of an FP8
tensor in its own nominal dtype is the FP8 tensor itself, which leaked into the export)
and equal the export of the same values held in plain parameters; the import must re-quantize the FP8 parameters in place through
`quantize_` (the objects stay, FP8). With real TE on a GPU: benchmarks/gpu_first_run.py
notes why it cannot check it there (no TE on that machine)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
LINEAR = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
TINY = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=256,
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False, torch_dtype="float32")  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _sum_world(x: float) -> float:
    import torch.distributed as dist

    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def worker(rank: int, world: int, port: int, tp: int, model_dir: str, result: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    from te_standin import StandInFloat8Tensor as Fp8

    from archer_mcore.model import fp8
    from archer_mcore.model.build import build_gpt_model
    from archer_mcore.model.hf_config import shape_from_hf_config
    from archer_mcore.model.hf_io import HFCheckpointReader
    from archer_mcore.model.weights import iter_hf_tensors, load_hf_weights, unwrap
    from archer_mcore.parallel.distributed import (
        destroy_distributed,
        init_model_parallel,
        init_process_group,
    )

    init_process_group()
    out: dict[str, Any] = {}
    try:
        init_model_parallel(tp, 1)
        shape = shape_from_hf_config(model_dir)
        model, _, _ = build_gpt_model(shape)
        load_hf_weights(model, HFCheckpointReader(model_dir), shape)
        m = unwrap(model)
        fp8._quantized_types = (Fp8,)  # where TE's QuantizedTensor goes when installed
        linear = {n: p for n, p in m.named_parameters() if n.endswith(LINEAR)}
        quant = {n: Fp8.quantize(p.data) for n, p in linear.items()}
        with torch.no_grad():  # the reference: plain parameters holding the FP8 values
            for n, p in linear.items():
                p.copy_(quant[n].dequantize(dtype=p.dtype))
        ref = {n: t.clone() for n, t in iter_hf_tensors(model, shape)}
        for n, p in linear.items():
            mod = m.get_submodule(n.rsplit(".", 1)[0])
            mod.weight = torch.nn.Parameter(quant[n], requires_grad=p.requires_grad)
        params = {n: m.get_submodule(n.rsplit(".", 1)[0]).weight for n in linear}
        out["fp8_params"] = _sum_world(sum(isinstance(p, Fp8) for p in params.values()))

        def export_errors(rtol: float = 0.0) -> tuple[float, str]:
            try:
                got = dict(iter_hf_tensors(model, shape, dtype=torch.float32))
            except Exception as e:  # before issue 21: all_gather on a storage-less tensor
                return -1.0, f"{type(e).__name__}: {str(e)[:300]}"
            wrong = [n for n in ref if type(got[n]) is not torch.Tensor
                     or not torch.allclose(got[n], ref[n], rtol=rtol, atol=0.0)]  # fmt: skip
            return float(len(wrong) + len(set(ref) ^ set(got))), ",".join(wrong[:4])

        wrong, out["export_error"] = export_errors()
        out["export_wrong"] = _sum_world(wrong)
        # import: scramble the FP8 weights, load the reference through the HF import
        with torch.no_grad():
            for p in params.values():
                p.quantize_(torch.randn(p.shape))
        Fp8.quantize_calls.clear()
        load_hf_weights(model, ref.__getitem__, shape)
        now = {n: m.get_submodule(n.rsplit(".", 1)[0]).weight for n in linear}
        out["same_objects"] = _sum_world(sum(now[n] is params[n] for n in linear))
        out["quantized_by_quantize_"] = _sum_world(
            sum(id(p) in Fp8.quantize_calls for p in params.values()))  # fmt: skip
        # re-quantizing FP8 values may move a scale by an ulp: equal to 1e-6 relative
        wrong, out["reexport_error"] = export_errors(rtol=1e-6)
        out["reexport_wrong"] = _sum_world(wrong)
        out["per_rank_linear"] = len(linear)
        if rank == 0:
            Path(result).write_text(json.dumps(out))
    finally:
        destroy_distributed()


@pytest.mark.parametrize("tp", [1, 2])
def test_fp8_parameters_export_dequantized_and_import_through_quantize(tmp_path, tp):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(TINY)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).float().save_pretrained(tmp_path / "hf")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "result.json"
    mp.start_processes(worker, args=(2, port, tp, str(tmp_path / "hf"), str(result)), nprocs=2,
                       join=True, start_method="spawn")  # fmt: skip
    out = json.loads(result.read_text())
    n = 2 * out["per_rank_linear"]  # 2 layers x 4 linears on each of the 2 ranks
    assert out["fp8_params"] == n == 16, out
    assert (out["export_wrong"], out["export_error"]) == (0.0, ""), out
    assert out["same_objects"] == n and out["quantized_by_quantize_"] == n, out
    assert (out["reexport_wrong"], out["reexport_error"]) == (0.0, ""), out
