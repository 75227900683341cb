"""The locks hold what CI tested: locks/dev.txt is exactly this venv, locks/sglang.txt
exactly the real-SGLang venv, and both agree with the ranges setup.py declares.

The project's commands install through the locks (Makefile, scripts/install_sglang.sh);
`make lock` rewrites them after a full test run and `make check-latest` tries the
newest allowed versions in a scratch venv (which sets ARCHER_UNLOCKED_VENV=1: its venv
is meant to differ from the lock, so the venv checks here skip there).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEV_LOCK = ROOT / "locks" / "dev.txt"
SGLANG_LOCK = ROOT / "locks" / "sglang.txt"
SGLANG_VENV = Path(
    os.environ.get("ARCHER_SGLANG_VENV", Path.home() / ".cache" / "archer-mcore" / "sglang-0.5.23")
)
unlocked_venv = pytest.mark.skipif(
    os.environ.get("ARCHER_UNLOCKED_VENV") == "1",
    reason="make check-latest / make lock run the tests in a venv that is meant to differ",
)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{lock}: not a name==version pin: {line!r}"
            pins[_norm(name)] = version
    return pins


def _installed(python: str) -> dict[str, str]:
    """{name: version} of every distribution of `python`'s environment, read in a fresh
    isolated process: in this one, an imported setuptools (>= 71) has put its _vendor
    folder on sys.path, whose vendored copies (jaraco.*, packaging, wheel, ...) would
    read as installed."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run([python, "-I", "-c", code], check=True, capture_output=True, text=True)
    found = {_norm(k): v for k, v in json.loads(out.stdout).items()}
    found.pop("archer-mcore", None)  # the project itself, installed editable
    return found


def _diff(lock: dict[str, str], venv: dict[str, str]) -> list[str]:
    return [
        f"{n}: lock {lock.get(n, '-')} / installed {venv.get(n, '-')}"
        for n in sorted(set(lock) | set(venv))
        if lock.get(n) != venv.get(n)
    ]


@unlocked_venv
def test_dev_lock_is_exactly_this_venv() -> None:
    diff = _diff(_pins(DEV_LOCK), _installed(sys.executable))
    assert not diff, "locks/dev.txt and the venv differ (run `make setup`, or `make lock`):\n" + (
        "\n".join(diff)
    )


@unlocked_venv
def test_sglang_lock_is_exactly_the_sglang_venv() -> None:
    python = SGLANG_VENV / "bin" / "python"
    if not python.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"no SGLang venv at {SGLANG_VENV} (make sglang)")
        pytest.skip(f"no SGLang venv at {SGLANG_VENV} (make sglang)")
    diff = _diff(_pins(SGLANG_LOCK), _installed(str(python)))
    assert not diff, "locks/sglang.txt and the SGLang venv differ:\n" + "\n".join(diff)


def _setup_requirements() -> list[Requirement]:
    """install_requires and the test extra of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
    )
    kw = {k.arg: k.value for k in call.keywords}
    reqs = ast.literal_eval(kw["install_requires"])
    extras = ast.literal_eval(kw["extras_require"])
    return [Requirement(r) for r in reqs + extras["test"]]


def test_locked_versions_satisfy_setup_py_ranges() -> None:
    pins = _pins(DEV_LOCK)
    bad = []
    for req in _setup_requirements():
        version = pins.get(_norm(req.name))
        if version is None:
            bad.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(Version(version).public, prereleases=True):
            bad.append(f"{req}: lock has {version}")
    assert not bad, bad

