"""Sandbox launcher: runs as a script
(`python -I -S sandbox_launcher.py SPEC_FD STATUS_FD`).

Standard library only; it is started by `archer_mcore.rewards.sandbox.Sandbox` as root
with an empty environment, reads its spec (JSON) from the inherited pipe SPEC_FD (so
the spec is not on any command line), reports a setup failure on the pipe STATUS_FD
(close-on-exec: the program never holds it, so it cannot fake one; STARTED is written
first, so a launcher that dies before the run is a setup failure too) and does, in
order:

1. arranges to die with the trainer: PR_SET_PDEATHSIG delivers SIGTERM when the
   trainer dies (checked once after the call, in case it already had); the handler
   kills the run and removes the run's scratch directory, which the dead trainer
   can no longer do;
2. `unshare(2)` new network (no interfaces but a down loopback), PID, IPC (System V
   objects and POSIX message queues die with the run), UTS (host name "sandbox"),
   cgroup and time namespaces, as the spec asks;
3. forks a supervisor (the PID namespace's init: when it exits the kernel kills every
   process left in the namespace, so fork bombs and daemonised children cannot
   outlive a run), which dies with the launcher (PR_SET_PDEATHSIG, SIGKILL; a pipe
   tells it if the launcher died before that took effect);
4. in the supervisor, a new mount namespace (the launcher stays in the host's): a
   minimal root (read-only system directories, a minimal /etc, four devices, a fresh
   /proc showing only the run's own processes, a size-capped tmpfs work directory
   with the run's files) and chroot into it (see `_setup_mounts`);
5. forks the program: resource limits (CPU seconds, address space, file size,
   processes, open files, no core dumps), drops to an unprivileged uid/gid with no
   supplementary groups, empties the uid's keyrings if it owns keys
   (`_clear_uid_keyrings`: uids repeat, keyrings outlive processes; the session
   keyring is a fresh one the program cannot write, `_private_session_keyring`), dies
   with the supervisor (PR_SET_PDEATHSIG), `chdir` to the work directory, `execve` with the
   spec's (scrubbed) environment;
6. when the program has exited, the supervisor (as the PID namespace's init) kills
   what is left of the run and empties the uid's keyrings again if it owns keys.

The launcher's exit status is the program's (128 + signal number if it was killed by
a signal); SETUP_FAILED_EXIT with a message on STATUS_FD if the sandbox could not be
set up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time

SETUP_FAILED_EXIT = 197
#: Exit status of a launcher or program that found its parent already dead.
PARENT_DIED_EXIT = 198
#: How long the launcher waits for a dying trainer to be gone before leaving the
#: scratch directory to it (`_parent_gone`), seconds.
PARENT_EXIT_WAIT_S = 3.0
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWTIME = 0x00000080
#: spec["isolate_<name>"] -> the namespace the launcher unshares (mount: the supervisor).
LAUNCHER_NAMESPACES = {
    "net": CLONE_NEWNET,
    "pid": CLONE_NEWPID,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
    "time": CLONE_NEWTIME,
}
HOSTNAME = b"sandbox"
#: First byte on STATUS_FD: the launcher runs (without it the run never started).
STARTED = b"R"
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
#: keyctl(2): the syscall (no libc wrapper) by machine, operations, special keyring ids.
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}.get(os.uname().machine)
KEYCTL_JOIN_SESSION_KEYRING, KEYCTL_SETPERM, KEYCTL_CLEAR, KEYCTL_INVALIDATE = 1, 5, 7, 21
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_PROCESS_KEYRING, KEY_SPEC_SESSION_KEYRING = -2, -3
KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -4, -5
KEY_POS_VIEW, KEY_POS_SEARCH = 0x01000000, 0x08000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
#: Where setup failures are reported (STATUS_FD; stderr until it is known).
_status_fd = 2


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _report_setup_failure(message: str) -> None:
    """Tell the trainer that the sandbox could not be set up (on STATUS_FD, which the
    program never holds: a program cannot make its own failure look like this)."""
    with contextlib.suppress(OSError):
        os.write(_status_fd, message.encode(errors="replace")[:2000])


def _keyctl(op: int, *args: int) -> int:
    if SYS_KEYCTL is None:
        return -1
    return _libc.syscall(SYS_KEYCTL, ctypes.c_long(op), *(ctypes.c_long(a) for a in args))


def _uid_has_keys(uid: int) -> bool:
    """True if `uid` owns any key or keyring now (/proc/key-users lists it)."""
    try:
        with open("/proc/key-users") as f:
            return any(line.split(":", 1)[0].strip() == str(uid) for line in f)
    except OSError:
        return True  # cannot tell: clear


def _private_session_keyring() -> None:
    """In the launcher (root), before anything forks: a new, empty session keyring that
    its children inherit, which the program may search but not write (possessor
    view+search only). Without it the program would possess the trainer's session
    keyring, shared by every run (and holding whatever the trainer's login put there)."""
    if _keyctl(KEYCTL_JOIN_SESSION_KEYRING, 0) >= 0:
        _keyctl(KEYCTL_SETPERM, KEY_SPEC_SESSION_KEYRING, KEY_POS_VIEW | KEY_POS_SEARCH)


def _clear_uid_keyrings() -> None:
    """In a process running as the run's uid: empty the uid's keyrings.

    Keyrings outlive processes: a uid's user and user-session keyrings (and its
    persistent keyring) keep their keys after every process of the uid has exited, and
    run uids repeat (every 1,000 runs of a trainer process), so a later run would find
    an earlier one's keys. This empties the user and user-session keyrings and
    invalidates the persistent keyring (recreated empty on demand). Called only when
    the uid owns keys (`_uid_has_keys`): looking the user keyrings up creates them, and
    they would then stay in the kernel. Where the kernel has no keys (or a seccomp
    filter refuses keyctl), there is nothing to clear.
    """
    _keyctl(KEYCTL_CLEAR, KEY_SPEC_USER_KEYRING)
    _keyctl(KEYCTL_CLEAR, KEY_SPEC_USER_SESSION_KEYRING)
    persistent = _keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_PROCESS_KEYRING)
    if persistent >= 0:
        _keyctl(KEYCTL_INVALIDATE, persistent)


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, *, data: str | None = None
) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(
        _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {target}",
    )


def _status_to_exit(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _bind_read_only(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _write_etc(etc: str, spec: dict) -> None:
    """A minimal /etc: copies of the host files in spec["etc_files"] (the dynamic
    loader's cache, the time zone) and a passwd/group/hosts naming only root and the
    run's uid ("sandbox") and localhost. Nothing else of the host's /etc."""
    os.makedirs(etc, exist_ok=True)
    for name in spec.get("etc_files", ()):
        source = os.path.join("/etc", name)
        if os.path.islink(source):
            os.symlink(os.readlink(source), os.path.join(etc, name))
        elif os.path.isfile(source):
            shutil.copyfile(source, os.path.join(etc, name))
    uid, gid, home = spec["uid"], spec["gid"], spec["inner_workdir"]
    synthetic = {
        "passwd": f"root:x:0:0::/:/usr/sbin/nologin\nsandbox:x:{uid}:{gid}::{home}:/bin/sh\n",
        "group": f"root:x:0:\nsandbox:x:{gid}:\n",
        "hosts": "127.0.0.1 localhost\n::1 localhost\n",
    }
    for name, text in synthetic.items():
        with open(os.path.join(etc, name), "w") as f:
            f.write(text)


def _setup_mounts(spec: dict) -> None:
    """Build the program's file system in the new mount namespace and chroot into it.

    The new root is a tmpfs holding only: read-only binds of the system directories
    (spec["root_binds"]: /usr, /lib, ... and the interpreter's prefix; top-level
    symlinks such as /bin -> usr/bin are recreated), a minimal /etc (`_write_etc`),
    the devices null/zero/random/urandom, a fresh /proc (with a PID namespace; only
    the run's own processes are visible), and the writable, size-capped work
    directory at spec["inner_workdir"], owned by the run's uid and holding the run's
    files. The root tmpfs is then made read-only. Nothing else of the host (the
    trainer's code, data sets, checkpoints, /tmp) is visible.
    """
    work = spec["workdir"]
    files: dict[str, bytes] = {}
    for name in os.listdir(work):
        with open(os.path.join(work, name), "rb") as f:
            files[name] = f.read()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = spec["new_root"]
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, data="size=1m,nr_inodes=1024,mode=0755")
    for path in spec["root_binds"]:
        if not os.path.lexists(path):
            continue
        target = root + path
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(path) and os.path.dirname(path) == "/":
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            _bind_read_only(path, target)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"):
        if os.path.exists(dev):
            open(root + dev, "w").close()
            _mount(dev, root + dev, None, MS_BIND)
            _mount(None, root + dev, None, MS_REMOUNT | MS_BIND | MS_NOSUID)
    os.makedirs(root + "/tmp", exist_ok=True)
    _write_etc(root + "/etc", spec)
    if spec["isolate_pid"]:
        os.makedirs(root + "/proc", exist_ok=True)
        # hidepid=2: a process sees only its own uid's entries, so not PID 1 (this
        # supervisor, root), whose command line is the launcher's.
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_RDONLY, data="hidepid=2")
    inner = root + spec["inner_workdir"]
    os.makedirs(inner, exist_ok=True)
    uid, gid = spec["uid"], spec["gid"]
    _mount(
        "tmpfs",
        inner,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        data=f"size={spec['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}",
    )
    for name, data in files.items():
        path = os.path.join(inner, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, gid)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/")


def _exec_program(spec: dict, parent: int) -> None:
    """In the program's process: limits, drop privileges, exec. Never returns.

    parent: the pid (as seen here) of the process that forked this one; the program
    is killed when that process dies (PR_SET_PDEATHSIG, set after the uid change,
    which clears it), and exits at once if it is already gone.
    """
    lim = spec["limits"]
    cpu = int(lim["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (lim["as_bytes"], lim["as_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize_bytes"], lim["fsize_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (lim["nproc"], lim["nproc"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (lim["nofile"], lim["nofile"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    if spec.get("uid_has_keys", True):
        _clear_uid_keyrings()
    _die_with_parent(signal.SIGKILL, parent)
    os.chdir(spec["inner_workdir"] if spec["isolate_mount"] else spec["workdir"])
    os.umask(0o077)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _run_program(spec: dict) -> int:
    """Fork the program, wait for it, return its exit code (128 + signal if killed)."""
    me = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            _exec_program(spec, me)
        except BaseException as err:
            _report_setup_failure(f"sandbox: exec failed: {type(err).__name__}: {err}")
        os._exit(SETUP_FAILED_EXIT)
    _, status = os.waitpid(pid, 0)  # retried by Python after EINTR
    if spec["isolate_pid"] and os.getpid() == 1:
        _end_of_run(spec)
    return _status_to_exit(status)


def _end_of_run(spec: dict) -> None:
    """In the PID namespace's init, after the program exited: kill what is left of the
    run (kill(-1) from a namespace's init reaches only that namespace), reap it, and
    empty the uid's keyrings if it owns keys (nothing of the run can store one again)."""
    with contextlib.suppress(OSError):
        os.kill(-1, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while True:
            os.waitpid(-1, 0)
    if not _uid_has_keys(spec["uid"]):
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
            _clear_uid_keyrings()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _die_with_parent(sig: int, parent: int) -> None:
    """Get `sig` when the parent dies; exit now if it already has (getppid() changed)."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(PARENT_DIED_EXIT)


def _supervisor(spec: dict, launcher_alive: int) -> None:
    """The launcher's child: PID 1 of the new PID namespace when there is one (when it
    exits the kernel kills every process left in the namespace). Never returns.

    launcher_alive: read end of a pipe whose write end only the launcher holds: EOF
    means the launcher is gone. (getppid() cannot tell here: it is 0 for a namespace's
    init, whose parent lives outside the namespace.)
    """
    code = SETUP_FAILED_EXIT
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        if select.select([launcher_alive], [], [], 0)[0]:
            os._exit(PARENT_DIED_EXIT)  # the launcher died before prctl took effect
        os.close(launcher_alive)
        if spec["isolate_mount"]:
            # Only this process and the program enter the new mount namespace: the
            # launcher stays in the host's, where the scratch directory has no mounts
            # and can be removed safely.
            _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _setup_mounts(spec)
        code = _run_program(spec)
    except BaseException as err:
        _report_setup_failure(f"sandbox: setup failed: {type(err).__name__}: {err}")
    os._exit(code)


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (the run's own uid; never the launcher's)."""
    if uid == os.getuid():
        return
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                continue


def _parent_gone(parent: int, wait_s: float) -> bool:
    """True once this process has been handed to another parent (its parent died).

    The death signal comes when the *thread* that started us exits; while the
    trainer's other threads are still exiting we are first handed to one of them,
    and getppid() still reads the trainer's pid. A trainer that dies does so within
    moments: wait up to `wait_s` before concluding that it lives on.
    """
    deadline = time.monotonic() + wait_s
    while os.getppid() == parent:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _read_spec(fd: int) -> dict:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def _unshare_namespaces(spec: dict) -> None:
    """New namespaces for the run, as the spec asks (all in one unshare(2)); in a new
    UTS namespace the host name becomes "sandbox" (the node's name stays hidden)."""
    flags = 0
    for name, flag in LAUNCHER_NAMESPACES.items():
        if spec.get(f"isolate_{name}"):
            flags |= flag
    if flags:
        _check(_libc.unshare(flags), "unshare")
    if flags & CLONE_NEWUTS:
        _check(_libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")


def main() -> None:
    global _status_fd
    spec = _read_spec(int(sys.argv[1]))
    if len(sys.argv) > 2:
        _status_fd = int(sys.argv[2])
        os.set_inheritable(_status_fd, False)  # closed by the program's execve
        os.write(_status_fd, STARTED)
    spec["uid_has_keys"] = _uid_has_keys(spec["uid"])  # host /proc, before the chroot
    _private_session_keyring()
    child: list[int] = []

    def parent_died(signum: int, frame: object) -> None:
        # The trainer died (PR_SET_PDEATHSIG) or someone asked us to stop: take the
        # run down, and remove its directory if the trainer can no longer do it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one pass; more may come
        for pid in child:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        if not spec["isolate_pid"]:
            _kill_uid(spec["uid"])
        if _parent_gone(spec["parent_pid"], PARENT_EXIT_WAIT_S):
            shutil.rmtree(spec["scratch"], ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, parent_died)
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "prctl")
        if os.getppid() != spec["parent_pid"]:
            parent_died(signal.SIGTERM, None)  # the trainer died before prctl took effect
        _unshare_namespaces(spec)
    except BaseException as err:
        _report_setup_failure(f"sandbox: setup failed: {type(err).__name__}: {err}")
        os._exit(SETUP_FAILED_EXIT)
    alive_r, alive_w = os.pipe()
    # SIGTERM waits until the child is recorded (and, in the child, until the
    # launcher's handler is replaced by the default action).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    pid = os.fork()  # PID 1 of the new PID namespace, if there is one
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        os.close(alive_w)
        _supervisor(spec, alive_r)
    child.append(pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.close(alive_r)
    _, status = os.waitpid(pid, 0)
    os._exit(_status_to_exit(status))


if __name__ == "__main__":
    main()
