"""Disk-path checkpoints load in transformers; bucket bookkeeping."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from archer_mcore.model.hf_io import HFWriteError, write_hf_checkpoint
from archer_mcore.rollout.hf_model import build_causal_lm
from archer_mcore.rollout.weight_sync import bucket_metadata, with_last_flag


def test_disk_checkpoint_loads_in_transformers_with_same_logits(tmp_path):
    """What /update_weights_from_disk would load: an HF directory transformers itself
    reads back to the same weights and logits (tokenizer/config files copied from base,
    base weights not)."""
    source = build_causal_lm(tiny_config(), seed=9)
    base = tmp_path / "base"
    build_causal_lm(tiny_config(), seed=1).save_pretrained(base)  # other weights
    (base / "tokenizer_config.json").write_text("{}")
    items = list(source.state_dict().items())
    names = write_hf_checkpoint([items[:7], [], items[7:]], tmp_path / "v1", base)
    assert sorted(names) == sorted(source.state_dict())
    files = sorted(p.name for p in (tmp_path / "v1").iterdir())
    assert "tokenizer_config.json" in files and "model.safetensors" not in files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "v1", dtype=torch.float32)
    for k, v in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, source(input_ids=ids).logits)
    assert not (tmp_path / "v1.partial").exists()


def test_checkpoint_errors_name_the_problem(tmp_path):
    t = torch.zeros(2)
    with pytest.raises(HFWriteError, match="repeats parameter 'a'"):
        write_hf_checkpoint([[("a", t)], [("a", t)]], tmp_path / "x", None)
    with pytest.raises(HFWriteError, match="no tensors"):
        write_hf_checkpoint([[]], tmp_path / "y", None)
    with pytest.raises(HFWriteError, match="has no config.json"):
        write_hf_checkpoint([[("a", t)]], tmp_path / "z", tmp_path)


def test_bucket_bookkeeping():
    a, b, c = (
        ("a", torch.zeros(2, 3)),
        ("b", torch.zeros(1, dtype=torch.bfloat16)),
        ("c", torch.zeros(())),
    )
    assert [(len(x), last) for x, last in with_last_flag([[a], [], [b, c], []])] == [
        (1, False),
        (2, True),
    ]
    assert list(with_last_flag([])) == []
    assert bucket_metadata([a, b, c]) == (["a", "b", "c"], ["float32", "bfloat16", "float32"],
                                          [[2, 3], [1], []])  # fmt: skip


def test_one_writer_for_convert_and_sync(tmp_path):
    """The convert path of the same writer: flat tensors in byte-budget shards, a lone shard
    as model.safetensors without index, config.json written; an existing directory is
    added to (convert) or replaced (`replace=True`, the sync path)."""
    from safetensors.torch import load_file

    from archer_mcore.model.hf_io import INDEX_FILE, HFCheckpointReader
    from archer_mcore.model.weights import bucketize

    ts = {f"w{i}": torch.full((4,), float(i)) for i in range(5)}  # 16 bytes each
    one = tmp_path / "one"
    one.mkdir()
    (one / "keep.txt").write_text("x")
    write_hf_checkpoint(bucketize(ts.items(), 1 << 20), one, config={"a": 1}, single_file=True)
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "keep.txt", "model.safetensors"]
    assert torch.equal(load_file(str(one / "model.safetensors"))["w3"], ts["w3"])
    names = write_hf_checkpoint(bucketize(ts.items(), 40), one, replace=True)
    assert names == list(ts) and not (one / "keep.txt").exists()
    assert len(list(one.glob("model-*-of-00003.safetensors"))) == 3 and (one / INDEX_FILE).is_file()
    reader = HFCheckpointReader(one)
    assert all(torch.equal(reader.get(n), t) for n, t in ts.items())
