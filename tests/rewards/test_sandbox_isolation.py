"""Sandboxed runs are isolated from each other and from the host's kernel state
(issue 22, items 7, 8 and 10), with the real sandbox launched as in production.

* System V IPC objects and POSIX message queues a run creates do not survive it: runs
  get their own IPC namespace (and UTS, cgroup and time namespaces where the kernel has
  them); checked from the host (/proc/sysvipc, mq_open) and from a later run.
* Keys a run stores in its uid's keyrings (user, user session, persistent) or in the
  session keyring it inherited are gone before any later run starts, even one that gets
  the same uid (uids repeat every 1,000 runs of a process).
* A sandbox that cannot be set up reports it on a channel the program cannot write:
  a program that imitates the launcher's failure message is not a setup failure, and a
  real setup failure is a reward fault, not a wrong answer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from archer_mcore.rewards import sandbox as sandbox_module
from archer_mcore.rewards.code_reward import score_code
from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, probe_isolation
from archer_mcore.rewards.types import SANDBOX_SETUP_FAILED, TESTS_FAILED

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and uid switching need root"),
]

BASE_UID = 310_000
LIMITS = SandboxLimits(wall_s=5.0, cpu_s=3.0, memory_mb=512, file_size_mb=4, max_processes=16)
#: The key (SysV) and name (POSIX) this module's IPC objects use: unique to the module.
IPC_KEY = 0x5A4E0000 + os.getpid() % 0xFFFF
MQ_NAME = f"/archer-test-{os.getpid()}"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
_SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217}.get(os.uname().machine)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine; the sandbox refuses to run")
    return Sandbox(LIMITS, base_uid=BASE_UID)


# ------------------------------------------------------------------ IPC (item 7)
CREATE_IPC = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
made = []
if libc.shmget({IPC_KEY}, 1 << 20, 0o1666) >= 0: made.append("shm")
if libc.semget({IPC_KEY}, 4, 0o1666) >= 0: made.append("sem")
if libc.msgget({IPC_KEY}, 0o1666) >= 0: made.append("msg")
libc.mq_open.restype = ctypes.c_int
if libc.mq_open(b"{MQ_NAME}", os.O_CREAT | os.O_RDWR, 0o666, None) >= 0: made.append("mq")
print(" ".join(made))
"""

SEE_IPC = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
seen = []
if libc.shmget({IPC_KEY}, 0, 0o666) >= 0: seen.append("shm")
if libc.semget({IPC_KEY}, 0, 0o666) >= 0: seen.append("sem")
if libc.msgget({IPC_KEY}, 0o666) >= 0: seen.append("msg")
libc.mq_open.restype = ctypes.c_int
if libc.mq_open(b"{MQ_NAME}", os.O_RDONLY, 0, None) >= 0: seen.append("mq")
for kind in ("shm", "sem", "msg"):
    with open("/proc/sysvipc/" + kind) as f:
        if len(f.read().splitlines()) > 1: seen.append("listed-" + kind)
print(" ".join(seen) or "nothing")
"""


def _host_ipc_with_key(key: int) -> list[str]:
    """SysV objects on the host (this process's IPC namespace) with `key`."""
    found = []
    for kind in ("shm", "sem", "msg"):
        lines = Path(f"/proc/sysvipc/{kind}").read_text().splitlines()
        found += [kind for line in lines[1:] if int(line.split()[0]) == key]
    return found


def _host_mq_exists(name: str) -> bool:
    _libc.mq_open.restype = ctypes.c_int
    fd = _libc.mq_open(name.encode(), os.O_RDONLY, 0, None)
    if fd >= 0:
        _libc.mq_close(fd)
        return True
    return False


def _remove_host_ipc(key: int, name: str) -> None:
    """Clean up what a failing (unfixed) sandbox leaked onto the host."""
    ipc_rmid = 0
    for kind, remove in (("shm", _libc.shmctl), ("sem", None), ("msg", _libc.msgctl)):
        for line in Path(f"/proc/sysvipc/{kind}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[0]) == key:
                if remove is None:
                    _libc.semctl(int(fields[1]), 0, ipc_rmid)
                else:
                    remove(int(fields[1]), ipc_rmid, None)
    _libc.mq_unlink(name.encode())


@pytest.fixture
def clean_ipc() -> Iterator[None]:
    _remove_host_ipc(IPC_KEY, MQ_NAME)
    yield
    _remove_host_ipc(IPC_KEY, MQ_NAME)


def test_ipc_objects_do_not_outlive_the_run(sandbox: Sandbox, clean_ipc: None) -> None:
    before = {k: Path(f"/proc/sysvipc/{k}").read_text() for k in ("shm", "sem", "msg")}
    run = sandbox.run_python(CREATE_IPC)
    assert run.exit_code == 0, run.describe()
    assert run.stdout.decode().split() == ["shm", "sem", "msg", "mq"]  # it could create them
    assert _host_ipc_with_key(IPC_KEY) == []
    assert not _host_mq_exists(MQ_NAME)
    after = {k: Path(f"/proc/sysvipc/{k}").read_text() for k in ("shm", "sem", "msg")}
    assert [line for k in after for line in after[k].splitlines() if str(IPC_KEY) in line] == []
    assert set(after) == set(before)
    # and a later run (another uid) sees nothing of it
    later = sandbox.run_python(SEE_IPC)
    assert later.stdout.decode().strip() == "nothing", later.describe()


def test_the_run_has_its_own_namespaces(sandbox: Sandbox) -> None:
    iso = sandbox.isolation
    assert (iso.ipc, iso.uts, iso.cgroup) == (True, True, True), iso.detail
    names = ["ipc", "uts", "cgroup", "net", "pid", "mnt"] + (["time"] if iso.time else [])
    src = (
        "import os, socket\n"
        f"for n in {names!r}:\n"
        "    print(n, os.readlink('/proc/self/ns/' + n))\n"
        "print('hostname', socket.gethostname())\n"
        "print('cgroup', '|'.join(open('/proc/self/cgroup').read().split()))\n"
    )
    run = sandbox.run_python(src)
    assert run.exit_code == 0, run.describe()
    seen = dict(line.split(" ", 1) for line in run.stdout.decode().splitlines())
    for n in names:
        assert seen[n] != os.readlink(f"/proc/self/ns/{n}"), n
    assert seen["hostname"] == "sandbox" != socket.gethostname()
    # the run's own cgroups are its roots: no host cgroup path shows (v1 or v2)
    assert all(line.endswith(":/") for line in seen["cgroup"].split("|")), seen["cgroup"]


# ------------------------------------------------------------------ keyrings (item 8)
KEY_SPEC_PROCESS, KEY_SPEC_SESSION, KEY_SPEC_USER, KEY_SPEC_USER_SESSION = -2, -3, -4, -5
KEYCTL_SEARCH, KEYCTL_GET_PERSISTENT, KEYCTL_CLEAR, KEYCTL_INVALIDATE = 10, 22, 7, 21

STASH_KEYS = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def add(desc, ring):
    return libc.syscall({_SYS_ADD_KEY}, b"user", desc, b"secret", 6, ctypes.c_long(ring)) >= 0
# linked into the process keyring: possessed, so writable
persistent = libc.syscall({_SYS_KEYCTL}, ctypes.c_long({KEYCTL_GET_PERSISTENT}),
                          ctypes.c_long(-1), ctypes.c_long({KEY_SPEC_PROCESS}))
print(" ".join(name for name, ok in [
    ("user", add(b"leak-user", {KEY_SPEC_USER})),
    ("user_session", add(b"leak-user-session", {KEY_SPEC_USER_SESSION})),
    ("session", add(b"leak-session", {KEY_SPEC_SESSION})),
    ("persistent", persistent >= 0 and add(b"leak-persistent", persistent)),
] if ok))
"""

FIND_KEYS = f"""
import ctypes
import dataclasses
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def find(desc, ring):
    return libc.syscall({_SYS_KEYCTL}, ctypes.c_long({KEYCTL_SEARCH}), ctypes.c_long(ring),
                        b"user", desc, ctypes.c_long(0)) >= 0
persistent = libc.syscall({_SYS_KEYCTL}, ctypes.c_long({KEYCTL_GET_PERSISTENT}),
                          ctypes.c_long(-1), ctypes.c_long({KEY_SPEC_PROCESS}))
found = [d for d in ("leak-user", "leak-user-session", "leak-session", "leak-persistent")
         for ring in ({KEY_SPEC_USER}, {KEY_SPEC_USER_SESSION}, {KEY_SPEC_SESSION}, persistent)
         if find(d.encode(), ring)]
print(" ".join(sorted(set(found))) or "nothing")
"""


def _clear_uid_keyrings(uid: int) -> None:
    """Test cleanup: empty `uid`'s keyrings (what an unfixed sandbox left behind)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(uid)
            os.setuid(uid)
            for ring in (KEY_SPEC_USER, KEY_SPEC_USER_SESSION):
                _libc.syscall(_SYS_KEYCTL, ctypes.c_long(KEYCTL_CLEAR), ctypes.c_long(ring))
            persistent = _libc.syscall(_SYS_KEYCTL, ctypes.c_long(KEYCTL_GET_PERSISTENT),
                                       ctypes.c_long(-1), ctypes.c_long(KEY_SPEC_USER))  # fmt: skip
            if persistent >= 0:
                _libc.syscall(
                    _SYS_KEYCTL, ctypes.c_long(KEYCTL_INVALIDATE), ctypes.c_long(persistent)
                )
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


@pytest.mark.skipif(_SYS_KEYCTL is None, reason="keyctl syscall number unknown here")
def test_keys_do_not_pass_to_a_later_run_with_the_same_uid(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = BASE_UID + 999  # the uid a run and the run 1,000 later get
    monkeypatch.setattr(sandbox_module, "_next_uid", lambda base: uid)
    try:
        first = sandbox.run_python(STASH_KEYS)
        assert first.exit_code == 0, first.describe()
        stored = first.stdout.decode().split()
        # the session keyring it inherits is not writable (nor the trainer's); its uid's
        # user, user-session and persistent keyrings are
        assert stored == ["user", "user_session", "persistent"], first.stdout
        later = sandbox.run_python(FIND_KEYS)
        assert later.exit_code == 0, later.describe()
        assert later.stdout.decode().strip() == "nothing"
        # nor are they left in the kernel between runs (checked as that uid, from here)
        assert _keys_found_as(uid) == "nothing"
    finally:
        _clear_uid_keyrings(uid)


@pytest.mark.skipif(_SYS_KEYCTL is None, reason="keyctl syscall number unknown here")
def test_the_trainers_session_keyring_is_out_of_reach(sandbox: Sandbox) -> None:
    # This process joins a session keyring holding a secret, as a login session would.
    assert _libc.syscall(_SYS_KEYCTL, ctypes.c_long(1), b"archer-test-trainer-session") >= 0
    key = _libc.syscall(_SYS_ADD_KEY, b"user", b"trainer-secret", b"s3cret", 6,
                        ctypes.c_long(KEY_SPEC_SESSION))  # fmt: skip
    assert key >= 0
    src = f"""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
found = libc.syscall({_SYS_KEYCTL}, ctypes.c_long({KEYCTL_SEARCH}),
                     ctypes.c_long({KEY_SPEC_SESSION}), b"user", b"trainer-secret", ctypes.c_long(0))
buf = ctypes.create_string_buffer(64)
read = libc.syscall({_SYS_KEYCTL}, ctypes.c_long(11), ctypes.c_long({key}), buf, ctypes.c_long(64))
added = libc.syscall({_SYS_ADD_KEY}, b"user", b"from-the-run", b"x", 1, ctypes.c_long({KEY_SPEC_SESSION}))
print(found >= 0, read >= 0, added >= 0)
"""
    run = sandbox.run_python(src)
    assert run.stdout.decode().split() == ["False", "False", "False"], run.describe()
    found = _libc.syscall(_SYS_KEYCTL, ctypes.c_long(KEYCTL_SEARCH), ctypes.c_long(KEY_SPEC_SESSION),
                          b"user", b"from-the-run", ctypes.c_long(0))  # fmt: skip
    assert found < 0  # nothing of the run reached this session keyring


def _keys_found_as(uid: int) -> str:
    """Run FIND_KEYS's search as `uid` outside any sandbox; its output."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            _libc.syscall(_SYS_KEYCTL, ctypes.c_long(1), None)  # a fresh session keyring
            found = []
            for desc in (b"leak-user", b"leak-user-session", b"leak-persistent"):
                for ring in (KEY_SPEC_USER, KEY_SPEC_USER_SESSION):
                    if _libc.syscall(_SYS_KEYCTL, ctypes.c_long(KEYCTL_SEARCH),
                                     ctypes.c_long(ring), b"user", desc, ctypes.c_long(0)) >= 0:  # fmt: skip
                        found.append(desc.decode())
            os.write(w, (" ".join(found) or "nothing").encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


# ------------------------------------------------------------------ setup failures (item 10)
def test_a_program_cannot_fake_a_setup_failure(sandbox: Sandbox) -> None:
    src = "import sys\nsys.stderr.write('sandbox: setup failed: nope\\n')\nsys.exit(197)"
    run = sandbox.run_python(src)
    assert run.exit_code == 197
    assert not run.setup_failed  # the program's own exit, not the launcher's
    r = score_code(f"```python\n{src}\n```", {"inputs": [""], "outputs": ["1"]}, sandbox)
    assert (r.correct, r.failure) == (False, TESTS_FAILED)


def test_a_setup_failure_is_a_reward_fault_not_a_wrong_answer(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A limit the kernel refuses (RLIMIT_NOFILE above fs.nr_open): the launcher cannot
    # set the sandbox up. Built past SandboxLimits' own checks, as a stale object would be.
    broken = Sandbox(LIMITS, base_uid=BASE_UID)
    bad = dict(vars(LIMITS))
    bad["max_open_files"] = 1 << 40
    object.__setattr__(broken, "limits", _unchecked_limits(bad))
    run = broken.run_python("print(1)")
    assert run.setup_failed and run.setup_error, run
    r = score_code("```python\nprint(1)\n```", {"inputs": [""], "outputs": ["1"]}, broken)
    assert (r.correct, r.failure, r.is_fault) == (False, SANDBOX_SETUP_FAILED, True), r


def _unchecked_limits(values: dict[str, object]) -> SandboxLimits:
    limits = object.__new__(SandboxLimits)
    for name, value in values.items():
        object.__setattr__(limits, name, value)
    return limits


CREATE_SYSV = "\n".join(line for line in CREATE_IPC.splitlines() if "mq_open" not in line)


def test_without_an_ipc_namespace_the_runs_sysv_objects_are_removed(clean_ipc: None) -> None:
    """The fallback where the kernel has no IPC namespace: the run's uid's System V
    objects are removed after the run (POSIX queues cannot be swept this way)."""
    weak = Sandbox(LIMITS, base_uid=BASE_UID)
    weak.isolation = dataclasses.replace(weak.isolation, ipc=False)
    run = weak.run_python(CREATE_SYSV)
    assert run.stdout.decode().split() == ["shm", "sem", "msg"], run.describe()
    assert _host_ipc_with_key(IPC_KEY) == []


def test_a_launcher_that_never_starts_the_run_is_a_setup_failure(
    sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A launcher that dies before it reports anything (here: its file is missing, as in
    a broken install) is not a program that failed its tests."""
    monkeypatch.setattr(sandbox_module, "_LAUNCHER", tmp_path / "missing_launcher.py")
    run = sandbox.run_python("print(1)")
    assert run.setup_failed and "before starting the run" in run.setup_error, run
    r = score_code("```python\nprint(1)\n```", {"inputs": [""], "outputs": ["1"]}, sandbox)
    assert (r.failure, r.is_fault) == (SANDBOX_SETUP_FAILED, True), r
