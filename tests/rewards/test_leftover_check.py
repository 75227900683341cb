"""The leftover check of conftest.py (`nothing_left_behind`) does catch leftovers: a
copy of it runs over a test module that leaves a sleeping process and a temporary
directory, and that run must fail naming both (and kill the process)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

LEAKY = """
import subprocess, tempfile
from pathlib import Path

def test_leaks(tmp_path):
    p = subprocess.Popen(["sleep", "60"])
    Path(tmp_path / "pid").write_text(str(p.pid))
    tempfile.mkdtemp(prefix="archer-sbx-leak-")
"""


@pytest.mark.slow  # waits out the check's grace period
def test_the_check_reports_a_leftover_process_and_directory(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), suite / "conftest.py")
    (suite / "test_leaky.py").write_text(LEAKY)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "base"),
            str(suite),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "processes left running after the module" in out and "sleep 60" in out, out
    assert "temporary files left after the module" in out and "archer-sbx-leak-" in out, out
    pid = int((tmp_path / "base" / "test_leaks0" / "pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
