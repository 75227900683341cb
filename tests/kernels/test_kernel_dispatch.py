"""The dispatcher: which implementation each mode picks, and that both paths agree
with the float64 reference and return the same types."""

from __future__ import annotations

import pytest
import torch
from archer_mcore.kernels import entropy_logprob as kernel1
from kernel_reference64 import entropy_logprob64, rel_err, token_terms64

from archer_mcore.actor import kernel_dispatch as dispatch
from archer_mcore.algo.losses import TokenTerms

CPU = torch.device("cpu")


def test_mode_resolution():
    assert dispatch.use_triton("torch", CPU) is False
    assert dispatch.use_triton("triton", CPU) is True
    assert dispatch.use_triton("auto", CPU) is False  # CPU: the torch reference
    # Under the interpreter triton does not compile, so even CUDA tensors would not
    # get a kernel in auto mode.
    assert dispatch.triton_compiles() is False
    assert dispatch.use_triton("auto", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="fast"):
        dispatch.use_triton("fast", CPU)


def test_auto_on_cpu_does_not_call_the_kernel(monkeypatch):
    def boom(*_args, **_kw):
        raise AssertionError("kernel called")

    monkeypatch.setattr(kernel1, "entropy_and_logprob", boom)
    z = torch.randn(3, 10)
    y = torch.tensor([1, 2, 3])
    dispatch.entropy_and_logprob(z, y, mode="auto")
    with pytest.raises(AssertionError, match="kernel called"):
        dispatch.entropy_and_logprob(z, y, mode="triton")


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_entropy_paths_match_float64(mode):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(5, 77, generator=g) * 2).requires_grad_()
    y = torch.randint(0, 77, (5,), generator=g)
    h, lp = dispatch.entropy_and_logprob(z, y, 0.9, mode=mode)
    (h + lp).sum().backward()
    z64 = z.detach().double().requires_grad_()
    h64, lp64 = entropy_logprob64(z64, y, 0.9)
    (h64 + lp64).sum().backward()
    assert rel_err(h, h64) < 1e-5 and rel_err(lp, lp64) < 1e-5 and rel_err(z.grad, z64.grad) < 1e-5


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_vocab_parallel_single_rank_with_padding(mode):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 80, generator=g).requires_grad_()
    y = torch.randint(0, 70, (4,), generator=g)
    h, lp = dispatch.vocab_parallel_entropy_and_logprob(
        z, y, 0, None, temperature=1.0, vocab_size=70, mode=mode
    )
    lp.sum().backward()
    h64, lp64 = entropy_logprob64(z.detach()[:, :70].double(), y, 1.0)
    assert rel_err(h, h64) < 1e-5 and rel_err(lp, lp64) < 1e-5
    assert z.grad[:, 70:].abs().max() == 0


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("vocab_size", [None, 50])
def test_lm_head_paths_match_float64(mode, vocab_size):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 12, generator=g).requires_grad_()
    weight = (torch.randn(60, 12, generator=g) / 2).requires_grad_()
    y = torch.randint(0, 50, (6,), generator=g)
    h, lp = dispatch.lm_head_entropy_and_logprob(
        hidden, weight, y, 0.7, vocab_size=vocab_size, mode=mode
    )
    (h - 2 * lp).sum().backward()
    v = vocab_size or 60
    h64_in = hidden.detach().double().requires_grad_()
    w64 = weight.detach()[:v].double().requires_grad_()
    e64, lp64 = entropy_logprob64(h64_in @ w64.T, y, 0.7)
    (e64 - 2 * lp64).sum().backward()
    assert rel_err(h, e64) < 1e-5 and rel_err(lp, lp64) < 1e-5
    assert rel_err(hidden.grad, h64_in.grad) < 1e-5
    assert rel_err(weight.grad[:v], w64.grad) < 1e-5
    if v < 60:
        assert weight.grad[v:].abs().max() == 0


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_token_terms_paths_match_float64(mode):
    g = torch.Generator().manual_seed(3)
    n = 50
    logp = (-torch.rand(n, generator=g) * 2).requires_grad_()
    old = logp.detach() + torch.randn(n, generator=g) * 0.5
    adv = torch.randn(n, generator=g)
    ref = logp.detach() + torch.randn(n, generator=g)
    eps = torch.where(torch.rand(n, generator=g) < 0.5, 0.2, 0.5)
    t = dispatch.token_terms(
        logp,
        old,
        adv,
        eps_low=eps,
        eps_high=eps,
        clip_c=3.0,
        ref_logp=ref,
        kl_estimator="k3",
        mode=mode,
    )
    assert isinstance(t, TokenTerms)
    (t.pg_loss + 0.1 * t.kl).sum().backward()
    lp64 = logp.detach().double().requires_grad_()
    want = token_terms64(lp64, old, adv, eps, eps, 3.0, ref, "k3")
    (want["pg_loss"] + 0.1 * want["kl"]).sum().backward()
    for key in ("pg_loss", "kl", "ratio"):
        assert rel_err(getattr(t, key), want[key]) < 1e-5
    for key in ("clipped_low", "clipped_high", "clipped_dual"):
        assert torch.equal(getattr(t, key), want[key])
    assert rel_err(logp.grad, lp64.grad) < 1e-5


def test_kernel_path_resolution_and_auto_says_so_once(caplog):
    r = dispatch.resolve_kernel_path
    assert r("torch", False, cuda=True, compiles=True) == dispatch.KernelPath("torch", False)
    assert r("triton", True, cuda=False) == dispatch.KernelPath("triton", True)
    assert r("auto", False, cuda=True, compiles=True).mode == "triton"
    assert r("auto", True, cuda=True, compiles=False).mode == "torch"
    auto_cpu = r("auto", True, cuda=False)
    assert (auto_cpu.mode, auto_cpu.fused_lm_head, auto_cpu.name) == (
        "torch",
        True,
        "torch+lm_head",
    )
    with pytest.raises(ValueError, match="kernels.mode"):
        r("fast", False, cuda=False)
    dispatch._SAID.clear()
    with caplog.at_level("INFO", logger=dispatch.log.name):
        assert dispatch.say_once(auto_cpu) is True
        assert dispatch.say_once(auto_cpu) is False  # once per process
        assert dispatch.say_once(r("torch", False, cuda=False)) is False  # explicit: silent
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines == ["kernels.mode auto: torch path (no CUDA device)"]


def test_kernels_package_imports_nothing_of_archer_mcore():
    """kernels/ is leaf code: no import of archer_mcore outside archer_mcore.kernels."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "kernels" / "src"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.startswith("archer_mcore") and not n.startswith("archer_mcore.kernels")
            ]
    assert len(list(root.glob("*.py"))) >= 5
    assert offenders == []
