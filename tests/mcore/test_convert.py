"""Offline HF <-> megatron conversion: layout rules checked against hand-built tensors,
and HF -> mcore -> HF round trips bitwise through the `archer convert` entry point."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import save_tiny_hf, tiny_hf_config
from safetensors.torch import load_file

from archer_mcore.cli.convert import add_args as add_convert_args
from archer_mcore.cli.convert import run as run_convert
from archer_mcore.model.convert import fuse_qkv, split_qkv, to_tp_shards
from archer_mcore.model.convert_dirs import shard_dir
from archer_mcore.model.hf_config import shape_from_hf_config
from archer_mcore.model.hf_io import HFCheckpointReader


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_convert_args(p)
    return p.parse_args(list(argv))


def test_qkv_interleaving_per_query_group_by_hand():
    # 4 heads, 2 KV groups, head_dim 1: q rows are heads 0..3, k rows groups 0..1, v too.
    shape = shape_from_hf_config(tiny_hf_config("qwen3", hidden_size=4, head_dim=1))
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = fuse_qkv(q, k, v, shape)
    # group 0: q heads 0,1 then k0, v0; group 1: q heads 2,3 then k1, v1.
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, shape), (q, k, v)))
    # TP=2 gives each rank one whole query group.
    from archer_mcore.model.convert import layer_rules

    rule = next(r for r in layer_rules(shape) if r.kind == "qkv")
    s0, s1 = to_tp_shards(rule, [q, k, v], shape, 2, 128)
    assert s0.flatten().tolist() == [10, 11, 20, 30] and s1.flatten().tolist() == [12, 13, 21, 31]


def test_gate_up_fused_per_rank_and_vocab_padding():
    shape = shape_from_hf_config(tiny_hf_config("qwen2"))
    from archer_mcore.model.convert import embedding_rule, layer_rules

    fc1 = next(r for r in layer_rules(shape) if r.kind == "gate_up")
    gate = torch.arange(4.0).reshape(4, 1)
    up = 10 + torch.arange(4.0).reshape(4, 1)
    r0, r1 = to_tp_shards(fc1, [gate, up], shape, 2, 128)
    assert r0.flatten().tolist() == [0, 1, 10, 11] and r1.flatten().tolist() == [2, 3, 12, 13]
    emb = torch.randn(100, 3)
    shards = to_tp_shards(embedding_rule(), [emb], shape, 2, 256)  # 100 -> 256 rows
    assert [s.shape[0] for s in shards] == [128, 128]
    assert torch.equal(shards[0][:100], emb) and not shards[0][100:].any() and not shards[1].any()


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_hf_mcore_hf_round_trip_is_bitwise(tmp_path, model_type, tp, pp):
    src = save_tiny_hf(model_type, tmp_path / "hf", seed=3)
    mc, back = tmp_path / "mcore", tmp_path / "back"
    assert (
        run_convert(
            _args(
                "--to-mcore", "--src", str(src), "--dst", str(mc), "--tp", str(tp), "--pp", str(pp)
            )
        )
        == 0
    )
    assert run_convert(_args("--to-hf", "--src", str(mc), "--dst", str(back))) == 0
    a, b = HFCheckpointReader(src), HFCheckpointReader(back)
    assert sorted(a.keys()) == sorted(b.keys())
    for k in sorted(a.keys()):
        x, y = a.get(k), b.get(k)
        assert x.dtype == y.dtype and torch.equal(x, y), k
    # Every rank got its own shard: TP shards of the QKV weight differ, layers split by PP.
    s = load_file(str(shard_dir(mc, tp - 1, pp - 1) / "model.safetensors"))
    assert (
        s["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0]
        == 2 * (2 + 2) * (16 if model_type == "qwen3" else 8) // tp
    )
    assert sum(k.endswith("linear_fc2.weight") for k in s) == 2 // pp
    assert (back / "config.json").is_file()


def test_missing_tensor_and_missing_shard_are_clear_errors(tmp_path, capsys):
    src = save_tiny_hf("qwen3", tmp_path / "hf", seed=4)
    mc = tmp_path / "mcore"
    assert run_convert(_args("--to-mcore", "--src", str(src), "--dst", str(mc), "--tp", "2")) == 0
    (shard_dir(mc, 1, 0) / "model.safetensors").unlink()
    assert run_convert(_args("--to-hf", "--src", str(mc), "--dst", str(tmp_path / "x"))) == 2
    assert "mp_rank_01_000" in capsys.readouterr().err
    assert (
        run_convert(
            _args("--to-hf", "--src", str(tmp_path / "nothing"), "--dst", str(tmp_path / "y"))
        )
        == 2
    )
