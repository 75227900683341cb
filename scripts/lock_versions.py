"""Write, and hold a venv to, a lock file: the exact distributions a test run passed with.

The project's own commands install the locked set (`pip install -c LOCK ...`, Makefile and
scripts/install_sglang.sh); setup.py keeps version ranges, so a user's own install of the
library is not pinned. Two verbs, each run with the venv's interpreter:

    python scripts/lock_versions.py write LOCK    # the venv's distributions -> LOCK (== pins)
    python scripts/lock_versions.py prune LOCK    # uninstall what LOCK does not list

`prune` keeps a reused venv equal to the lock after the lock drops a package
(a fresh venv, as CI makes, has nothing to prune). The editable archer-mcore itself is
never locked. tests/test_lock.py checks that the lock covers the test venv exactly.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
from pathlib import Path

#: distributions never written into a lock: the project itself (installed editable)
UNLOCKED = {"archer-mcore"}


def normalize(name: str) -> str:
    """PEP 503 name normalisation (`Foo_Bar.baz` -> `foo-bar-baz`)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{normalised name: version} of a lock file's `name==version` lines."""
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{path}:{lineno}: expected name==version, got {raw!r}")
        pins[normalize(name)] = version.strip()
    return pins


def _freeze() -> list[str]:
    """`pip freeze` of this interpreter's environment, without the editable project."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("#")]
    bad = [ln for ln in lines if "==" not in ln]
    if bad:
        raise SystemExit(f"cannot lock distributions installed from a path or URL: {bad}")
    return sorted(
        (ln for ln in lines if normalize(ln.split("==")[0]) not in UNLOCKED),
        key=lambda ln: normalize(ln.split("==")[0]),
    )


def write(lock: Path) -> None:
    pins = _freeze()
    header = [
        f"# Written by `python scripts/lock_versions.py write {lock}` "
        f"({datetime.date.today().isoformat()}, Python {platform.python_version()}, "
        f"{platform.machine()}).",
        "# The exact set the tests passed with; `make lock` re-resolves, tests and rewrites it.",
    ]
    lock.write_text("\n".join(header + pins) + "\n")
    print(f"{lock}: {len(pins)} distributions")


def prune(lock: Path) -> None:
    pins = read_lock(lock)
    extra = [ln.split("==")[0] for ln in _freeze() if normalize(ln.split("==")[0]) not in pins]
    if extra:
        print(f"uninstalling what {lock} does not list: {' '.join(extra)}")
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *extra],
                       check=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("verb", choices=("write", "prune"))
    p.add_argument("lock", type=Path)
    args = p.parse_args(argv)
    {"write": write, "prune": prune}[args.verb](args.lock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
