"""Code tests cannot be passed without solving them (issue 14, item 6), and the sandbox
shows a program nothing of the host it does not need (/proc/1, /etc).

Each exploit below passed every case on the old harness (which shipped the expected
values into the sandbox and judged there); each must now score 0, while honest
solutions of the same problems pass. The expected values are random tokens, so only
a leak could produce them.
"""

from __future__ import annotations

import ast
import uuid

import pytest

from archer_mcore.rewards.code_reward import score_code
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, probe_isolation

pytestmark = pytest.mark.timeout(120)

LIMITS = SandboxLimits(wall_s=5.0, cpu_s=3.0, memory_mb=512, file_size_mb=4, max_processes=16)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine; the sandbox refuses to run")
    return Sandbox(LIMITS, base_uid=310_000)


def _py(source: str) -> str:
    return f"```python\n{source}\n```"


def _secret_calls() -> tuple[dict, list[str]]:
    """A function-call problem whose answers are unguessable: f(i) -> a random token."""
    answers = [f"ANSWER-{uuid.uuid4().hex}" for _ in range(3)]
    return {"fn_name": "f", "inputs": [[0], [1], [2]], "outputs": answers}, answers


def test_honest_solutions_still_pass(sandbox: Sandbox) -> None:
    gt, answers = _secret_calls()
    table = dict(enumerate(answers))
    honest = f"def f(i):\n    return {table!r}[i]"  # knows the answers: a real solution
    assert score_code(_py(honest), gt, sandbox).correct
    # tuples are lists, floats to 1e-6, APPS's one-element wrapping, Solution methods
    src = "class Solution:\n    def div(self, a, b):\n        print('noise')\n        return (a / b, a // b)"
    calls = {"fn_name": "div", "inputs": [[1, 3], [7, 2]], "outputs": [[[0.3333333, 0]], [3.5, 3]]}
    r = score_code(_py(src), calls, sandbox)
    assert r.correct and r.fraction_passed == 1.0, r.detail
    stdio = {"inputs": ["2 3\n"], "outputs": ["5\n"]}
    assert score_code(_py("a, b = map(int, input().split())\nprint(a + b)"), stdio, sandbox).correct


def test_reading_the_cases_file_does_not_pass(sandbox: Sandbox) -> None:
    gt, _ = _secret_calls()
    src = """
import json, os
def f(i):
    for name in os.listdir("."):
        try:
            data = json.load(open(name))
        except Exception:
            continue
        for case in data if isinstance(data, list) else []:
            if isinstance(case, dict) and case.get("args") == [i] and "expected" in case:
                return case["expected"]
    return "not found"
"""
    r = score_code(_py(src), gt, sandbox)
    assert (r.correct, r.fraction_passed) == (False, 0.0), r.detail


def test_forged_verdict_lines_do_not_pass(sandbox: Sandbox) -> None:
    gt, _ = _secret_calls()
    # Print lines in the old verdict format and in the new result format (with a
    # guessed value), several times, straight to fd 1, then leave before the harness.
    src = """
import os, sys
tag = sys.argv[1]
for i in range(3):
    os.write(1, f"{tag} {i} ok \\"guess\\"\\n".encode())
    os.write(1, f"{tag} {i} 1 ok\\n".encode())
os._exit(0)
"""
    r = score_code(_py(src), gt, sandbox)
    assert (r.correct, r.fraction_passed) == (False, 0.0), r.detail


def test_patching_the_harness_does_not_pass(sandbox: Sandbox) -> None:
    gt, _ = _secret_calls()
    # Replace whatever compares in __main__ with "always equal", and return an object
    # equal to everything: both judged here, outside the sandbox, they fail.
    src = """
import __main__, json
always = lambda *a, **k: True
for name in ("values_equal", "_equal", "call_result_matches", "stdout_matches"):
    setattr(__main__, name, always)
class Anything:
    def __eq__(self, other):
        return True
def f(i):
    return Anything()
"""
    r = score_code(_py(src), gt, sandbox)
    assert (r.correct, r.fraction_passed) == (False, 0.0), r.detail


def test_searching_proc_and_the_file_system_does_not_pass(sandbox: Sandbox) -> None:
    gt, _ = _secret_calls()
    # Every readable file outside the (expected-free) system directories, every visible
    # process's command line and environment, the parent's included.
    src = """
import os, re
def f(i):
    found = []
    paths = ["/proc/%d/%s" % (os.getppid(), n) for n in ("cmdline", "environ")]
    for top in ("/proc", "/sandbox", "/tmp", "/etc", "/dev/shm", "."):
        for root, dirs, files in os.walk(top):
            if root.startswith("/proc/") and root.count("/") > 2:
                dirs[:] = []
            paths += [os.path.join(root, name) for name in files]
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read(1 << 20).decode(errors="replace")
        except OSError:
            continue
        found += re.findall("ANSWER-[0-9a-f]{32}", data)
    return found[i] if len(found) > i else "none"
"""
    r = score_code(_py(src), gt, sandbox)
    assert (r.correct, r.fraction_passed) == (False, 0.0), r.detail


def test_proc_and_etc_show_nothing_of_the_host(sandbox: Sandbox) -> None:
    """PID 1 of the run's namespace is the launcher's fork; its command line used to
    carry the launcher's spec (host paths). /etc held the host's whole /etc."""
    src = """
import os
seen = {}
for pid in ["1"] + [p for p in os.listdir("/proc") if p.isdigit()]:
    try:
        seen[pid] = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        pass
print(repr(seen))
print(repr(sorted(os.listdir("/etc"))))
print(open("/etc/passwd").read().count(":x:"))
"""
    run = sandbox.run_python(src)
    assert run.exit_code == 0, run.describe()
    lines = run.stdout.decode().splitlines()
    cmdlines = ast.literal_eval(lines[0])
    assert "1" not in cmdlines  # the supervisor (root) is invisible to the program
    assert cmdlines, "the program should at least see itself"
    for cmd in cmdlines.values():
        assert "launcher" not in cmd and "archer" not in cmd and "scratch" not in cmd, cmd
        assert cmd.split("\0")[:4] == [sandbox.python, "-I", "-B", "main.py"], cmd
    assert ast.literal_eval(lines[1]) == [
        "group",
        "hosts",
        "ld.so.cache",
        "ld.so.conf",
        "localtime",
        "passwd",
    ]
    assert int(lines[2]) == 2  # root and the run's uid, no host accounts
