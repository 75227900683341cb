#!/usr/bin/env bash
# The newest versions setup.py allows, installed into a scratch venv and tested.
#
#   bash scripts/resolve_latest.sh           # `make check-latest`: .venv-latest, fast tests
#   bash scripts/resolve_latest.sh --write   # `make lock`: .venv-lock (+ .venv-lock-sglang for
#                                            # the real-SGLang tests), every test, then the
#                                            # locks/ files are rewritten from those venvs
#   bash scripts/resolve_latest.sh -- ARGS   # pytest ARGS instead of the default selection
#
# It prints what moved against locks/dev.txt before the tests run, so a failure can be
# traced to a release. Exit status: the tests'. Nothing is written unless the tests pass.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

write=0
if [[ "${1:-}" == "--write" ]]; then write=1; shift; fi
if (( write )); then
    venv=.venv-lock; sglang_venv="$PWD/.venv-lock-sglang"; tests=()
else
    venv=.venv-latest; sglang_venv=""; tests=(-m "not slow")
fi
if [[ "${1:-}" == "--" ]]; then shift; tests=("$@"); fi

rm -rf "$venv"
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'

echo "versions that differ from locks/dev.txt (lock -> newest allowed):"
"$venv/bin/python" - <<'PYEOF'
import importlib.metadata as md, re
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = {}
for line in open("locks/dev.txt"):
    line = line.split("#", 1)[0].strip()
    if line:
        name, _, version = line.partition("==")
        lock[norm(name)] = version
now = {norm(d.metadata["Name"]): d.version for d in md.distributions()}
now.pop("archer-mcore", None)
for name in sorted(set(lock) | set(now)):
    if lock.get(name) != now.get(name):
        print(f"  {name}: {lock.get(name, '-')} -> {now.get(name, '-')}")
PYEOF

if (( write )); then
    export ARCHER_SGLANG_VENV="$sglang_venv" ARCHER_SGLANG_LOCK=""  # the tests' harness too
    bash scripts/install_sglang.sh
fi
"$venv/bin/ruff" check .
# tests/test_lock.py compares the venv with the lock: not this venv's business
ARCHER_UNLOCKED_VENV=1 "$venv/bin/python" -m pytest "${tests[@]}"

if (( write )); then
    "$venv/bin/python" scripts/lock_versions.py write locks/dev.txt
    "$sglang_venv/bin/python" scripts/lock_versions.py write locks/sglang.txt
    echo "locks rewritten: review 'git diff locks/', run 'make test' on a fresh clone, commit"
fi
