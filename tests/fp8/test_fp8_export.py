"""FP8 rollout checkpoint: quantise/export round trip on a tiny Qwen3 on CPU, and the
names, dtypes and scales SGLang's fp8 loader expects."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from archer_mcore.rollout.fp8_export import (
    E4M3_MAX,
    dequantize_weight,
    export_fp8_checkpoint,
    is_fp8_linear,
    quantize_blockwise,
    quantize_buckets,
    quantize_per_tensor,
    quantize_weight,
)

# every finite e4m3 value, decoded from its 256 bit patterns
_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_VALUES = torch.unique(_CODES[torch.isfinite(_CODES)])


def _error_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest e4m3 error of w / scale, back in w's units: normal numbers have
    3 mantissa bits (half an ulp = 2^-4 relative); subnormals are spaced 2^-9 (half:
    2^-10); plus fp32 slack."""
    return w.abs() * 2.0**-4 + scale * 2.0**-10 + w.abs() * 1e-6


def _assert_nearest(q: torch.Tensor, target: torch.Tensor):
    """Each fp8 value is a nearest representable e4m3 value to the float64 target (up
    to the fp32 rounding of the division, 2^-24 relative, which can tip a near-tie)."""
    t = target.double().reshape(-1, 1)
    dist = (t - E4M3_VALUES.reshape(1, -1)).abs()
    best = dist.min(dim=1).values
    got = (t.squeeze(1) - q.double().reshape(-1)).abs()
    assert torch.all(got <= best + 2.0**-23 * t.squeeze(1).abs() + 1e-12)


def test_per_tensor_round_trip_is_within_e4m3_precision():
    torch.manual_seed(0)
    w = torch.randn(96, 80) * 0.02
    w[3, 7] = -0.5  # the amax element maps to -448 exactly
    q, s = quantize_per_tensor(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.dim() == 0
    assert float(s) == pytest.approx(0.5 / 448, rel=1e-7)
    assert float(q[3, 7].float()) == -E4M3_MAX
    _assert_nearest(q, w.double() / float(s))
    deq = dequantize_weight(q, s, None)
    assert torch.all((deq - w).abs() <= _error_bound(w, s))
    assert (deq - w).abs().max() > 0  # it is a real quantisation


def test_blockwise_scales_and_round_trip_on_ragged_shapes():
    torch.manual_seed(1)
    w = torch.randn(200, 300, dtype=torch.bfloat16)
    w[128:200, 256:300] = 0  # an all-zero (partial) block gets scale 1
    q, s = quantize_blockwise(w, (128, 128))
    assert q.shape == (200, 300) and s.shape == (2, 3) and s.dtype == torch.float32
    x = w.float()
    for i in range(2):
        for j in range(3):
            blk = x[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            amax = float(blk.abs().max())
            expected = amax / 448 if amax > 0 else 1.0
            assert float(s[i, j]) == pytest.approx(expected, rel=1e-7)
            qb = q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            _assert_nearest(qb, blk.double() / float(s[i, j]))
    assert float(s[1, 2]) == 1.0 and torch.all(q[128:, 256:].float() == 0)
    deq = dequantize_weight(q, s, (128, 128))
    scale_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:200, :300]
    assert torch.all((deq - x).abs() <= _error_bound(x, scale_full))


def test_blockwise_is_finer_than_per_tensor_for_outlier_rows():
    torch.manual_seed(2)
    w = torch.randn(256, 256) * 0.01
    # half the rows 1e5 x larger: per tensor, the small rows fall below e4m3's normal
    # range (2^-6 of the scale) and lose their precision; their own blocks keep it
    w[:128] *= 1e5
    qt, st = quantize_per_tensor(w)
    qb, sb = quantize_blockwise(w)
    err_t = (dequantize_weight(qt, st, None) - w)[128:].abs().mean()
    err_b = (dequantize_weight(qb, sb, (128, 128)) - w)[128:].abs().mean()
    assert err_b < err_t / 10


def test_which_names_are_quantised():
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.11.mlp.down_proj.weight",
        "model.layers.3.self_attn.o_proj.weight",
        "model.layers.3.mlp.gate_proj.weight",
    ):
        assert is_fp8_linear(name)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.0.input_layernorm.weight",
    ):
        assert not is_fp8_linear(name)


def test_quantize_buckets_keeps_order_and_pairs_scales():
    w = torch.randn(8, 8)
    buckets = [
        [
            ("model.embed_tokens.weight", torch.randn(4, 8)),
            ("model.layers.0.self_attn.q_proj.weight", w),
        ],
        [("model.layers.0.mlp.up_proj.weight", w.clone())],
    ]
    out = list(quantize_buckets(buckets, scheme="tensor"))
    assert [[n for n, _ in b] for b in out] == [
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.weight_scale",
        ],
        ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight_scale"],
    ]
    assert out[0][0][1].dtype == torch.bfloat16 and out[0][1][1].dtype == torch.float8_e4m3fn


TINY = dict(
    vocab_size=320,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
)


def _safetensors_header(path: Path) -> dict:
    """The JSON header SGLang's loader reads: name -> {dtype, shape, offsets}."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


@pytest.mark.parametrize("scheme", ["block", "tensor"])
def test_tiny_qwen3_export_round_trip(tmp_path, scheme):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**TINY)
    model = transformers.Qwen3ForCausalLM(config).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = tmp_path / "base"
    base.mkdir()
    config.save_pretrained(base)
    (base / "tokenizer_config.json").write_text("{}")
    items = list(state.items())
    buckets = [items[: len(items) // 2], items[len(items) // 2 :]]
    out = tmp_path / "fp8"
    names = export_fp8_checkpoint(buckets, out, base_model_dir=base, scheme=scheme)

    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["activation_scheme"] == "dynamic"
    assert qc.get("weight_block_size") == ([128, 128] if scheme == "block" else None)
    assert cfg["hidden_size"] == 128 and (out / "tokenizer_config.json").is_file()

    header: dict = {}
    for f in sorted(out.glob("model-*.safetensors")):
        header.update({k: v for k, v in _safetensors_header(f).items() if k != "__metadata__"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(header) == set(names)
    suffix = "_scale_inv" if scheme == "block" else "_scale"
    linear = [n for n in state if is_fp8_linear(n)]
    assert len(linear) == 2 * 7  # q k v o gate up down per layer
    for name, t in state.items():
        if name in linear:
            assert header[name]["dtype"] == "F8_E4M3"
            assert header[name]["shape"] == list(t.shape)
            sc = header[name + suffix]
            assert sc["dtype"] == "F32"
            rows, cols = t.shape
            want = [-(-rows // 128), -(-cols // 128)] if scheme == "block" else []
            assert sc["shape"] == want
        else:
            assert header[name]["dtype"] == "BF16" and name + suffix not in header

    # dequantise what was written and compare with the originals
    loaded: dict[str, torch.Tensor] = {}
    for f in out.glob("model-*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
                loaded[k] = fh.get_tensor(k)
    restored = {}
    for name, t in state.items():
        if name in linear:
            s = loaded[name + suffix]
            deq = dequantize_weight(loaded[name], s, (128, 128) if scheme == "block" else None)
            if scheme == "block":
                s = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[
                    : t.shape[0], : t.shape[1]
                ]
            assert torch.all((deq - t).abs() <= _error_bound(t, s)), name
            restored[name] = deq
        else:
            torch.testing.assert_close(loaded[name].float(), t.to(torch.bfloat16).float())
            restored[name] = loaded[name].float()
    # the restored weights drive the same model to nearly the same logits
    twin = transformers.Qwen3ForCausalLM(config).eval()
    twin.load_state_dict(restored)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        a, b = model(ids).logits, twin(ids).logits
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.99


def test_bad_scheme_and_backend_are_named():
    with pytest.raises(ValueError, match="scheme"):
        quantize_weight(torch.ones(2, 2), "channel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        quantize_weight(torch.ones(2, 2), "tensor", backend="te")  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("scheme", ["block", "tensor"])
def test_modelopt_backend_gives_the_same_bytes(scheme):
    pytest.importorskip("modelopt.torch.quantization.qtensor")
    torch.manual_seed(3)
    w = torch.randn(200, 300, dtype=torch.bfloat16)
    q_t, s_t = quantize_weight(w, scheme, backend="torch")
    q_m, s_m = quantize_weight(w, scheme, backend="modelopt")
    assert q_m.dtype == torch.float8_e4m3fn and q_m.shape == q_t.shape
    assert torch.equal(q_t.view(torch.uint8), q_m.view(torch.uint8))
    torch.testing.assert_close(s_m, s_t, rtol=0, atol=0)
    zeros = torch.zeros(128, 128)
    q0, s0 = quantize_weight(zeros, scheme, backend="modelopt")
    assert torch.all(q0.float() == 0) and torch.all(s0 == 1)
