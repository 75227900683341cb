"""Nothing in the repository shadows an installed package, however the code is started.

Python puts a directory first on `sys.path` in three ways users and CI take here: the
working directory for `python -m ...` and `python -c` (the repository root, as
slurm/archer_job.sh and `python -m pytest` run it), the script's folder for `python
benchmarks/x.py`, and each test file's folder under pytest's default `prepend` import
mode (no `__init__.py` in tests/). A regular package or module there wins over
site-packages: transformers 5.25 imports Hugging Face's `kernels`, and the repository's
own `kernels/__init__.py` (later `benchmarks/kernels.py`) was found instead, which
broke every clean install (issue 28).

The checks, each against the real interpreter and the installed distributions:
- transformers' hub-kernels integration and the CLI import from the repository root;
- no top-level folder but `archer_mcore` is a regular package (it would be importable
  from the root under its folder name, and several are names on PyPI: kernels,
  configs, benchmarks, monitoring, slurm, scripts);
- no module or package in a folder whose files run as scripts (benchmarks/, scripts/,
  tests/ and its subfolders) has the top-level name of an installed distribution or of
  the standard library, and no folder there merges into an installed namespace
  package;
- with each of those folders first on sys.path, transformers' kernels integration and
  the trainer import;
- every benchmark script answers `--help` run as a user runs it.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: folders whose .py files are run as scripts (their folder becomes sys.path[0])
SCRIPT_FOLDERS = ("benchmarks", "scripts", "tests")
#: the project's own package: the one top-level name that is meant to import
OWN_PACKAGE = "archer_mcore"
_SKIP_DIRS = {"__pycache__", "shims"}  # shims: put on PYTHONPATH for the SGLang venv only


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


def _installed_top_level_names() -> set[str]:
    """Top-level import names of every installed distribution, plus the stdlib's."""
    names = set(md.packages_distributions())
    names |= set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    return names - {OWN_PACKAGE}


def _script_folders() -> list[Path]:
    """Every folder under SCRIPT_FOLDERS that can end up first on sys.path."""
    out = []
    for top in SCRIPT_FOLDERS:
        base = ROOT / top
        out.append(base)
        out += [p for p in base.rglob("*") if p.is_dir() and not (_SKIP_DIRS & set(p.parts))]
    return sorted(out)


def test_hf_kernels_is_installed_and_found_from_the_repository_root() -> None:
    # transformers 5.25 depends on `kernels`; the lock installs it, so the shadowing
    # case is live in every venv made by the project's commands
    assert md.version("kernels")
    code = (
        "import kernels, transformers.integrations.hub_kernels as h; "
        "print(kernels.__file__); print(h.__name__)"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    kernels_file = Path(res.stdout.splitlines()[0]).resolve()
    assert "site-packages" in kernels_file.parts, kernels_file


def test_cli_runs_as_python_m_from_the_repository_root() -> None:
    # what slurm/archer_job.sh runs on every node (cd "$ARCHER_HOME"; python -m ...)
    res = subprocess.run(
        [sys.executable, "-m", "archer_mcore.cli", "train", "--help"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "usage: archer train" in res.stdout


def test_no_top_level_folder_is_a_regular_package() -> None:
    packages = sorted(
        p.name
        for p in ROOT.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "__init__.py").exists()
    )
    assert packages == [OWN_PACKAGE], (
        f"top-level folders with an __init__.py: {packages}; from the repository root each "
        "imports under its folder name and shadows any installed package of that name"
    )


def test_script_folders_hold_no_installed_top_level_name() -> None:
    installed = _installed_top_level_names()
    clashes = []
    for folder in _script_folders():
        for entry in folder.iterdir():
            if entry.suffix == ".py":
                name = entry.stem
            elif entry.is_dir() and (entry / "__init__.py").exists():
                name = entry.name
            else:
                continue
            if name in installed:
                clashes.append(str(entry.relative_to(ROOT)))
    assert not clashes, f"modules that shadow an installed package when run: {clashes}"


def test_no_test_folder_merges_into_an_installed_namespace_package() -> None:
    # a folder without __init__.py joins an installed namespace package of its name
    # (megatron is one: megatron-core ships megatron/core with no megatron/__init__.py)
    namespaces = set()
    for name in _installed_top_level_names():
        try:
            with warnings.catch_warnings():  # setuptools' distutils hack warns on look-up
                warnings.simplefilter("ignore")
                spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.origin is None and spec.submodule_search_locations:
            namespaces.add(name)
    assert "megatron" in namespaces  # the case this test exists for
    merged = [
        str(d.relative_to(ROOT))
        for folder in _script_folders()
        for d in folder.iterdir()
        if d.is_dir() and d.name in namespaces
    ]
    assert not merged, f"folders that would join an installed namespace package: {merged}"


@pytest.mark.parametrize("folder", [*SCRIPT_FOLDERS, "."])
def test_trainer_imports_with_each_script_folder_first_on_sys_path(folder: str) -> None:
    """The real hazard, run: each folder first on sys.path, as a script or test there has."""
    path = ROOT / folder
    code = (
        f"import sys; sys.path.insert(0, {str(path)!r}); "
        "import transformers.integrations.hub_kernels, kernels; "
        "import archer_mcore.train.loop, archer_mcore.cli.main; "
        "assert 'site-packages' in kernels.__file__, kernels.__file__"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=path, env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize(
    "script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py")), ids=str
)
def test_benchmark_script_answers_help_as_a_user_runs_it(script: str) -> None:
    # python benchmarks/X.py puts benchmarks/ first on sys.path. The end-to-end small runs
    # as scripts are in tests/kernels (kernel_bench --smoke, gpu_check.sh --smoke),
    # tests/benchmarks (algorithms --smoke, packing) and tests/longctx (checkpoint_io);
    # async_rollout and convert are checked here and by the sys.path test above
    res = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("usage:"), res.stdout[:500]
