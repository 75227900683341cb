"""Sandbox launcher: runs as a script (`python -I -S sandbox_launcher.py SPEC_JSON`).

Standard library only; it is started by `archer_mcore.rewards.sandbox.Sandbox` as root
with an empty environment and does, in order:

1. `unshare(2)` new network (no interfaces but a down loopback), mount and PID
   namespaces, as the spec asks;
2. forks the namespace's init (PID 1, dies with the launcher via PR_SET_PDEATHSIG;
   when it exits the kernel kills every process left in the namespace, so fork
   bombs and daemonised children cannot outlive a run);
3. in the mount namespace: a minimal root (read-only system directories, four
   devices, a fresh /proc showing only the namespace's processes, a size-capped tmpfs
   work directory with the run's files) and chroot into it (see `_setup_mounts`);
4. forks the program: resource limits (CPU seconds, address space, file size,
   processes, open files, no core dumps), drops to an unprivileged uid/gid with no
   supplementary groups, `chdir` to the work directory, `execve` with the spec's
   (scrubbed) environment.

The launcher's exit status is the program's (128 + signal number if it was killed by
a signal); SETUP_FAILED_EXIT with a message on stderr if isolation could not be set up.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys

SETUP_FAILED_EXIT = 197
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


class SetupError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(err)}")


def _mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
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


def _setup_mounts(spec: dict) -> None:
    """Build the program's file system in the new mount namespace and chroot into it.

    The new root is a tmpfs holding only: read-only binds of the system directories
    (spec["root_binds"]: /usr, /etc, ... and the interpreter's prefix; top-level
    symlinks such as /bin -> usr/bin are recreated), the devices null/zero/random/
    urandom, a fresh /proc (with a PID namespace), and the writable, size-capped work
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
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
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
    if spec["isolate_pid"]:
        os.makedirs(root + "/proc", exist_ok=True)
        _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_RDONLY)
    inner = root + spec["inner_workdir"]
    os.makedirs(inner, exist_ok=True)
    uid, gid = spec["uid"], spec["gid"]
    _mount(
        "tmpfs",
        inner,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={spec['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={gid}",
    )
    for name, data in files.items():
        path = os.path.join(inner, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chown(path, uid, gid)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/")


def _exec_program(spec: dict) -> None:
    """In the program's process: limits, drop privileges, exec. Never returns."""
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
    os.chdir(spec["inner_workdir"] if spec["isolate_mount"] else spec["workdir"])
    os.umask(0o077)
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def _run_program(spec: dict) -> int:
    """Fork the program, wait for it, return its exit code (128 + signal if killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            _exec_program(spec)
        except BaseException as err:
            os.write(2, f"sandbox: exec failed: {err}\n".encode())
        os._exit(SETUP_FAILED_EXIT)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return _status_to_exit(status)
        except InterruptedError:
            continue


def _namespace_init(spec: dict) -> None:
    """PID 1 of the new namespaces. Never returns."""
    code = SETUP_FAILED_EXIT
    try:
        # getppid() is 0 here (the launcher lives outside this PID namespace), so a
        # launcher killed before this line is not detected; the program's CPU limit
        # still bounds the orphaned run.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if spec["isolate_mount"]:
            _setup_mounts(spec)
        code = _run_program(spec)
    except BaseException as err:
        os.write(2, f"sandbox: setup failed: {err}\n".encode())
    os._exit(code)


def main() -> None:
    spec = json.loads(sys.argv[1])
    flags = 0
    flags |= CLONE_NEWNET if spec["isolate_net"] else 0
    flags |= CLONE_NEWNS if spec["isolate_mount"] else 0
    flags |= CLONE_NEWPID if spec["isolate_pid"] else 0
    try:
        if flags:
            _check(_libc.unshare(flags), "unshare")
        if not spec["isolate_pid"]:
            if spec["isolate_mount"]:
                _setup_mounts(spec)
            os._exit(_run_program(spec))
    except BaseException as err:
        os.write(2, f"sandbox: setup failed: {err}\n".encode())
        os._exit(SETUP_FAILED_EXIT)
    pid = os.fork()  # becomes PID 1 of the new PID namespace
    if pid == 0:
        _namespace_init(spec)
    _, status = os.waitpid(pid, 0)
    os._exit(_status_to_exit(status))


if __name__ == "__main__":
    main()
