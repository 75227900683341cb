"""The code sandbox against hostile programs, and the code reward end to end.

Each hostile program is given a test case that only an escape could pass (its
expected output is what it prints when the attack succeeds), so "scored 0" means
"contained"; side effects are also checked from outside. A benign control program
passes, so the zeros are not a broken sandbox. Limits are small (wall 3 s, CPU 2 s).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from archer_mcore.rewards.code_reward import score_code
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, probe_isolation
from archer_mcore.rewards.types import TESTS_FAILED

pytestmark = pytest.mark.timeout(120)

BASE_UID = 300_000
LIMITS = SandboxLimits(wall_s=3.0, cpu_s=2.0, memory_mb=512, file_size_mb=4, max_processes=16)


def _is_zombie(pid: str) -> bool:
    """Dead but not yet reaped (by whichever process adopted it): holds no resources."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def _no_uid_processes_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _uid_processes():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _uid_processes() -> list[int]:
    """PIDs of processes owned by any uid the test sandbox hands out."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if BASE_UID <= uid < BASE_UID + 5_000_000 and not _is_zombie(entry):
                pids.append(int(entry))
    return pids


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine; the sandbox refuses to run")
    return Sandbox(LIMITS, base_uid=BASE_UID)


def _py(source: str) -> str:
    return f"```python\n{source}\n```"


def _stdio(expected: str) -> dict[str, list[str]]:
    return {"inputs": [""], "outputs": [expected]}


@pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid switching need root")
def test_isolation_is_complete_here() -> None:
    # As root in our containers all three namespaces are available.
    iso = probe_isolation()
    assert (iso.net, iso.mount, iso.pid) == (True, True, True), iso.detail


def test_benign_program_passes_and_stdin_is_fed(sandbox: Sandbox) -> None:
    src = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))"
    gt = {"inputs": ["1 2 3\n", "10 -4\n", "7\n"], "outputs": ["6\n", "6\n", "8\n"]}
    r = score_code(_py(src), gt, sandbox)
    # sums: 1+2+3 = 6, 10-4 = 6, 7 != 8 -> 2 of 3 cases pass
    assert (r.correct, r.score, r.failure) == (False, 0.0, TESTS_FAILED)
    assert r.fraction_passed == pytest.approx(2 / 3)
    gt["outputs"][2] = "7\n"
    assert score_code(_py(src), gt, sandbox).correct


def test_function_call_cases(sandbox: Sandbox) -> None:
    src = "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n                return [seen[target - x], i]\n            seen[x] = i\n        print('noise')\n"
    gt = {
        "fn_name": "twoSum",
        "inputs": [[[2, 7, 11, 15], 9], [[3, 2, 4], 6], [[1, 2], 7]],
        "outputs": [[0, 1], [1, 2], None],
    }
    # [2,7]: 2+7=9 at 0,1; [3,2,4]: 2+4=6 at 1,2; [1,2] has no pair -> returns None
    r = score_code(_py(src), gt, sandbox)
    assert r.correct and r.fraction_passed == 1.0
    gt["outputs"][1] = [0, 2]
    r = score_code(_py(src), gt, sandbox)
    assert not r.correct and r.fraction_passed == pytest.approx(2 / 3)


def test_environment_is_scrubbed_and_parent_env_unreadable(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "s3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("ARCHER_TEST_SECRET", secret)
    assert os.environ["ARCHER_TEST_SECRET"] == secret
    src = f"""
import os, glob
found = [v for v in os.environ.values() if "s3cret" in v]
for path in ["/proc/{os.getpid()}/environ", "/proc/{os.getppid()}/environ", "/proc/1/environ",
             "/proc/self/environ"] + glob.glob("/proc/*/environ"):
    try:
        data = open(path, "rb").read().decode(errors="replace")
        if "s3cret" in data:
            found.append(data[data.index("s3cret"):][:39])
    except OSError:
        pass
print(found[0] if found else "none")
"""
    run = sandbox.run_python(src)
    assert run.exit_code == 0, run.describe()
    assert run.stdout.decode().strip() == "none"
    assert secret.encode() not in run.stdout + run.stderr
    r = score_code(_py(src), _stdio(secret), sandbox)
    assert r.score == 0.0 and not r.correct


def test_socket_cannot_reach_the_host_or_outside(sandbox: Sandbox) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    src = f"""
import socket
ok = []
for addr in [("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 80)]:
    try:
        socket.create_connection(addr, timeout=1).close()
        ok.append(addr)
    except OSError:
        pass
print("connected" if ok else "isolated")
"""
    try:
        run = sandbox.run_python(src)
        assert run.stdout.decode().strip() == "isolated", run.describe()
        r = score_code(_py(src), _stdio("connected"), sandbox)
        assert r.score == 0.0
    finally:
        stop.set()
        t.join()
        server.close()
    assert accepted == []


def test_cannot_write_outside_its_directory(sandbox: Sandbox, tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # even a world-writable directory stays untouched
    name = "escape-" + uuid.uuid4().hex
    targets = [
        f"/tmp/{name}",
        f"/dev/shm/{name}",
        str(tmp_path / name),
        str(Path.cwd() / name),
        f"/{name}",
    ]
    src = f"""
wrote = []
for path in {targets!r}:
    try:
        with open(path, "w") as f:
            f.write("x")
        wrote.append(path)
    except OSError:
        pass
open("inside.txt", "w").write("fine")  # its own directory is writable
print("wrote" if wrote else "blocked", open("inside.txt").read())
"""
    run = sandbox.run_python(src)
    assert run.stdout.decode().split() == ["blocked", "fine"], run.describe()
    assert not any(os.path.exists(p) for p in targets)
    assert score_code(_py(src), _stdio("wrote fine"), sandbox).score == 0.0


def test_cannot_read_the_trainers_files(sandbox: Sandbox, tmp_path: Path) -> None:
    """World-readable host files (a data set with the expected outputs, this test's own
    source, the repository) are not visible: the program sees a minimal root."""
    tmp_path.chmod(0o755)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("the-expected-output\n")
    answers.chmod(0o644)
    src = f"""
import os
seen = []
for path in [{str(answers)!r}, {__file__!r}, {str(Path.cwd() / "setup.py")!r}]:
    try:
        seen.append(open(path).read()[:19])
    except OSError:
        pass
print(seen[0] if seen else "hidden", sorted(os.listdir("/")))
"""
    run = sandbox.run_python(src)
    out = run.stdout.decode().split(" ", 1)
    assert out[0] == "hidden", run.describe()
    # only the system directories, devices, proc, tmp and its own directory exist
    assert set(ast.literal_eval(out[1])) <= {
        "usr",
        "bin",
        "sbin",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "etc",
        "dev",
        "proc",
        "tmp",
        "sandbox",
    }
    assert score_code(_py(src), _stdio("the-expected-output"), sandbox).score == 0.0


def test_cannot_kill_its_parent_or_the_trainer(sandbox: Sandbox) -> None:
    src = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}, 1, -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
print("alive")
"""
    # kill(-1) may take the program itself down: either way it must score 0 and the
    # test process (whose pid the program targets) must survive.
    r = score_code(_py(src), _stdio("killed"), sandbox)
    assert r.score == 0.0
    os.kill(os.getpid(), 0)
    assert score_code(_py("print(5)"), _stdio("5"), sandbox).correct  # still serving


def test_memory_hog_is_contained(sandbox: Sandbox) -> None:
    # A 200 MiB cap: the hog touches under 200 MiB before MemoryError, which keeps it
    # fast on a loaded machine (the default 512 MiB cap would take seconds to fill).
    small = Sandbox(dataclasses.replace(sandbox.limits, memory_mb=200), base_uid=BASE_UID)
    src = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 * 1024))"
    start = time.monotonic()
    r = score_code(_py(src), _stdio("done"), small)
    assert r.score == 0.0 and "MemoryError" in r.detail, r.detail
    assert time.monotonic() - start < LIMITS.wall_s + 2


def test_huge_print_is_cut_off(sandbox: Sandbox) -> None:
    src = "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range(1024 * 1024):\n    sys.stdout.write(line)"
    start = time.monotonic()
    run = sandbox.run_python(src)
    assert run.output_overflow and len(run.stdout) <= LIMITS.max_output_bytes
    assert time.monotonic() - start < LIMITS.wall_s + 2
    assert score_code(_py(src), _stdio("x"), sandbox).score == 0.0


@pytest.mark.slow
def test_infinite_loop_is_killed(sandbox: Sandbox) -> None:
    start = time.monotonic()
    r = score_code(
        _py("while True:\n    pass"), {"inputs": ["", ""], "outputs": ["1", "1"]}, sandbox
    )
    elapsed = time.monotonic() - start
    assert r.score == 0.0 and r.fraction_passed == 0.0
    assert "SIGXCPU" in r.detail or "SIGKILL" in r.detail or "wall-time" in r.detail, r.detail
    # the second case is skipped after the first hits a limit: about one wall limit
    assert elapsed < LIMITS.wall_s + 2.5, elapsed


@pytest.mark.slow
def test_infinite_loop_in_a_called_function(sandbox: Sandbox) -> None:
    src = "def f(x):\n    if x == 2:\n        while True:\n            pass\n    return x"
    gt = {"fn_name": "f", "inputs": [[1], [2], [3]], "outputs": [1, 2, 3]}
    start = time.monotonic()
    r = score_code(_py(src), gt, sandbox)
    # the per-case alarm stops case 1; cases 0 and 2 pass
    assert not r.correct and r.fraction_passed == pytest.approx(2 / 3), r.detail
    assert time.monotonic() - start < LIMITS.wall_s + 2


@pytest.mark.slow
def test_fork_bomb_is_contained_and_leaves_nothing(sandbox: Sandbox) -> None:
    src = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    start = time.monotonic()
    r = score_code(_py(src), _stdio("boom"), sandbox)
    assert r.score == 0.0
    assert time.monotonic() - start < LIMITS.wall_s + 3
    assert _no_uid_processes_within(5), _uid_processes()
    assert score_code(_py("print(1)"), _stdio("1"), sandbox).correct


@pytest.mark.slow
def test_fallback_without_mount_and_pid_namespaces(sandbox: Sandbox) -> None:
    """Where only the network namespace exists: uid switch + limits still apply and the
    run's uid is swept afterwards (no PID namespace to take its processes down)."""
    from archer_mcore.rewards.sandbox import Isolation

    weak = Sandbox(LIMITS, base_uid=BASE_UID)
    weak.isolation = Isolation(net=True, mount=False, pid=False)
    assert score_code(
        _py("print(int(input()) + 1)"), {"inputs": ["41\n"], "outputs": ["42\n"]}, weak
    ).correct
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    run = weak.run_python(daemon)
    assert run.stdout.decode().strip() == "parent done"
    assert _no_uid_processes_within(5), _uid_processes()  # the detached sleeper was killed
    src = "import socket\ntry:\n    socket.create_connection(('8.8.8.8', 53), timeout=1)\n    print('connected')\nexcept OSError:\n    print('isolated')"
    assert weak.run_python(src).stdout.decode().strip() == "isolated"
