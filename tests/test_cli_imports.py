"""`archer --help`, `archer VERB --help` and `archer config show` never load torch (issue
16): each runs the CLI's `main` in a fresh interpreter, then lists what got imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
HEAVY = ("torch", "megatron", "transformers", "safetensors", "triton")

# Runs main(argv), keeps its exit code (--help exits through SystemExit), and prints the
# heavy top-level packages that ended up in sys.modules as the last line of stdout.
PROBE = """
import json, sys
from archer_mcore.cli import main
try:
    code = main(json.loads(sys.argv[1]))
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"code": code, "heavy": heavy}))
"""


def _imports_of(argv: list[str]) -> tuple[dict[str, object], str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]), "\n".join(lines[:-1])


VERBS = ("config", "train", "eval", "export", "convert", "plan", "submit", "data")


@pytest.mark.parametrize(
    "argv",
    [["--help"], *([verb, "--help"] for verb in VERBS), ["config", "show", "--help"]],
    ids=lambda argv: " ".join(argv),
)
def test_help_does_not_import_torch(argv: list[str]) -> None:
    got, out = _imports_of(argv)
    assert got == {"code": 0, "heavy": []}, got
    assert out.startswith("usage: archer"), out  # the help really was printed


def test_config_show_does_not_import_torch() -> None:
    got, out = _imports_of(["config", "show", str(DEMO), "-o", "train.steps=7"])
    assert got == {"code": 0, "heavy": []}, got
    # the resolved config really was printed, with the override applied
    assert "\ntrain:\n" in f"\n{out}" and "  steps: 7\n" in out, out


def test_the_probe_sees_torch_when_a_verb_loads_it(tmp_path: Path) -> None:
    # The check is not vacuous: `archer convert` that runs (a missing source directory,
    # exit 2) imports safetensors.torch, and so torch, and the probe reports it.
    got, _ = _imports_of(
        ["convert", "--to-hf", "--src", str(tmp_path / "none"), "--dst", str(tmp_path / "o")]
    )
    assert got["code"] == 2 and {"torch", "safetensors"} <= set(got["heavy"]), got


def test_python_dash_m_runs_the_same_command() -> None:
    # slurm/archer_job.sh runs `python -m archer_mcore.cli train ...` on the nodes.
    from archer_mcore import __version__

    proc = subprocess.run(
        [sys.executable, "-m", "archer_mcore.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"archer-mcore {__version__}"
