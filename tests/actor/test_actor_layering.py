"""The actor package's imports run one way, and `MegatronPolicy` has every member of the
`Policy` protocol the RL loop calls, with the same parameters."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import archer_mcore
from archer_mcore.actor.policy import MegatronPolicy
from archer_mcore.actor.protocol import Policy

PKG = Path(archer_mcore.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every archer_mcore module a file imports, at any depth (TYPE_CHECKING included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("archer_mcore")}


def test_actor_never_imports_the_loop_and_checkpoints_never_import_the_policy():
    files = sorted((PKG / "actor").glob("*.py"))
    assert {f.stem for f in files} >= {"policy", "checkpoint", "checkpoint_store", "protocol"}
    for f in files:
        bad = {m for m in _imports(f) if m.startswith(("archer_mcore.train", "archer_mcore.cli"))}
        assert not bad, f"{f.name} imports {bad}"
    for f in (PKG / "actor").glob("checkpoint*.py"):
        assert "archer_mcore.actor.policy" not in _imports(f), f.name
    store = _imports(PKG / "actor" / "checkpoint_store.py")
    assert not {m for m in store if m.startswith("archer_mcore.actor.checkpoint")}
    # the loss normaliser's units are counted in algo/, which knows nothing of megatron
    src = (PKG / "algo" / "losses.py").read_text()
    assert "megatron" not in src and "def normalizer_units" in src


def test_megatron_policy_has_the_protocol():
    members = [n for n in dir(Policy) if not n.startswith("_")] + list(
        Policy.__annotations__
    )
    assert {"compute_logprobs", "train_step", "save_checkpoint", "reference"} <= set(members)
    init = inspect.getsource(MegatronPolicy.__init__)
    for name in set(members):
        if name in Policy.__annotations__:  # a data attribute, set in __init__
            assert f"self.{name} =" in init, name
            continue
        want, got = getattr(Policy, name), getattr(MegatronPolicy, name, None)
        assert got is not None, name
        if isinstance(want, property):
            assert isinstance(got, property), name
            continue
        params = list(inspect.signature(want).parameters)
        assert list(inspect.signature(got).parameters) == params, name
