"""The run-folder lock: one trainer per run folder, released when the trainer ends, however it ends.

Torch-free: the trainer holds it (``hold``), ``ablation status`` probes it (``is_held``). Two kinds, chosen
per lock path (``lock_mode``, from ``/proc/self/mountinfo``): **kernel** (the default), a POSIX record lock
(``fcntl.lockf``) on ``<run>/.lock``; **file** (the fallback, where the file system's kernel locks are
local or missing), ``<run>/.lock.held`` created with ``O_EXCL``, heartbeated every ``HEARTBEAT_S`` seconds
and taken over when stale. ``ABLATION_LOCK=kernel|file|auto`` forces a kind. Why each, what each file
system does, and the heartbeat and takeover rules: docs/reliability.md, section "Run-folder lock".
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation.errors import AblationError

log = logging.getLogger("ablation")

ENV = "ABLATION_LOCK"  # auto | kernel | file
HEARTBEAT_S = 10.0
STALE_S = 90.0
HELD_SUFFIX = ".held"  # the file-mode lock: <lock path>.held, there only while held
UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}
BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}


class LockBusy(AblationError):
    """The lock is held by another live process (or by this one); the message names the holder."""

    def __init__(self, what: str, holder: str):
        super().__init__(f"{what} is in use by {holder}; wait for it or stop it")
        self.holder = holder


# ---------------------------------------------------------------- which kind of lock


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, what file system, with which options."""

    point: str
    fstype: str
    options: frozenset[str]


def _unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mount_of(path: str | Path, mountinfo: str | None = None) -> Mount | None:
    """The mount holding `path` (the longest mount point above it), or None where mountinfo is unreadable."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    p = os.path.realpath(path)
    best: Mount | None = None
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or not tail:
            continue
        point = _unescape(fields[4])
        if not (point == "/" or p == point or p.startswith(point.rstrip("/") + "/")):
            continue
        if best is None or len(point) >= len(best.point):  # later lines are mounted over earlier ones
            opts = set(fields[5].split(","))
            if len(tail) >= 3:
                opts |= set(tail[2].split(","))
            best = Mount(point, tail[0], frozenset(opts))
    return best


def _file_mode_reason(m: Mount | None) -> str | None:
    """Why kernel locks on this mount cannot be trusted across nodes, or None when they can (or may be tried)."""
    if m is None:
        return None
    fs, o = m.fstype, m.options
    if fs == "lustre" and "localflock" in o:
        return "Lustre mounted with localflock: kernel locks are per node"
    if fs == "lustre" and "noflock" in o:
        return "Lustre mounted with noflock: no kernel locks"
    if fs.startswith("nfs") and ("nolock" in o or "local_lock=posix" in o or "local_lock=all" in o):
        return "NFS mounted with nolock or local_lock: kernel locks are per node"
    if fs == "beegfs":
        return "BeeGFS: kernel locks are per node unless tuneUseGlobalFileLocks (set ABLATION_LOCK=kernel if it is)"
    if fs in ("cifs", "smb3") and "nobrl" in o:
        return "CIFS mounted with nobrl: kernel locks are per node"
    if fs == "fuse.sshfs":
        return "sshfs: kernel locks are per node"
    return None


def lock_mode(path: str | Path) -> tuple[str, str]:
    """("kernel" | "file", why) for a lock at `path`: ABLATION_LOCK if set, else from its mount."""
    forced = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if forced in ("kernel", "file"):
        return forced, f"{ENV}={forced}"
    if forced != "auto":
        raise AblationError(f"{ENV}={forced!r}: expected auto, kernel or file")
    why = _file_mode_reason(mount_of(Path(path).parent))
    return ("file", why) if why else ("kernel", "")


# ---------------------------------------------------------------- who holds it


def _machine() -> dict[str, str]:
    """What makes a pid meaningful: host name, boot id (a reboot reuses pids) and pid namespace."""
    ident = {"host": socket.gethostname(), "boot_id": "", "pidns": ""}
    try:
        ident["boot_id"] = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        pass
    try:
        ident["pidns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return ident


def _pid_alive(pid: int) -> bool:
    """True while `pid` runs here (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :][:1] not in ("Z", "X")
    except (OSError, ValueError):
        return True


@dataclass(frozen=True)
class Owner:
    """What a file-mode lock file says about its holder, and when it last moved."""

    info: dict[str, Any]  # empty when unparsable (being written, or torn)
    mtime: float
    dev_ino: tuple[int, int]

    @property
    def heartbeat(self) -> float:
        """The latest sign of life: the heartbeat written in it or the file's mtime."""
        try:
            return max(self.mtime, float(self.info.get("heartbeat", 0)))
        except (TypeError, ValueError):
            return self.mtime

    def describe(self, now: float | None = None) -> str:
        """'pid N on host (lock file, heartbeat 3 s ago)'."""
        age = max(0.0, (now or time.time()) - self.heartbeat)
        who = f"pid {self.info.get('pid', '?')} on {self.info.get('host', '?')}" if self.info else "a process still writing the lock file"
        return f"{who} (lock file, heartbeat {age:.0f} s ago)"

    def stale_reason(self, stale_s: float, now: float | None = None) -> str | None:
        """Why this lock can be taken over, or None while its holder may be alive."""
        me, i = _machine(), self.info
        if i and all(i.get(k) == me[k] for k in ("host", "boot_id", "pidns")) and isinstance(i.get("pid"), int):
            if not _pid_alive(i["pid"]):
                return f"pid {i['pid']} on {i['host']} is gone"
        age = (now or time.time()) - self.heartbeat
        if age > stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def same(self, other: Owner) -> bool:
        """The same lock (not a newer one at the same path)."""
        if self.info.get("token") and other.info.get("token"):
            return self.info["token"] == other.info["token"]
        return self.dev_ino == other.dev_ino


def read_owner(path: str | Path) -> Owner | None:
    """The lock file's owner, or None when there is no such file. Opened afresh: NFS revalidates on open."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        info = json.loads(raw)
        info = info if isinstance(info, dict) else {}
    except ValueError:
        info = {}
    return Owner(info, st.st_mtime, (st.st_dev, st.st_ino))


def _held_path(path: str | Path) -> Path:
    return Path(f"{path}{HELD_SUFFIX}")


# ---------------------------------------------------------------- the lock


_registry: dict[str, FolderLock] = {}  # realpath of the lock -> the lock this process holds there
_registry_guard = threading.Lock()


def _forget_after_fork() -> None:
    """A forked child holds none of its parent's POSIX locks, and must not answer as if it did."""
    global _registry_guard
    _registry_guard = threading.Lock()
    _registry.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _kernel_try(fd: int) -> None:
    """Take the POSIX lock on fd without waiting, after checking no flock (an older harness) holds the file.

    Raises BlockingIOError-like OSError (errno in BUSY) when held, OSError (errno in UNSUPPORTED) when
    this file system has no such locks.
    """
    _flock_probe(fd)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _flock_probe(fd: int) -> None:
    """Raise OSError (errno in BUSY) when some process holds an flock on fd's file; a file system without flock is let be."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            return
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)


class FolderLock:
    """An exclusive lock at `path` (``<run>/.lock``); a context manager. See the module docstring.

    ``retries`` x ``retry_s``: how long a busy kernel lock is retried (``ablation status`` holds it
    for an instant when it probes).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        what: str | None = None,
        mode: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stale_s: float = STALE_S,
        retries: int = 10,
        retry_s: float = 0.1,
    ):
        self.path = Path(path)
        self.held_path = _held_path(self.path)
        self.what = what or str(self.path)
        self.mode, self.why = (mode, "") if mode else lock_mode(self.path)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.retries, self.retry_s = max(1, retries), retry_s
        self.lost = False
        self._key = os.path.realpath(self.path)
        self._fd: int | None = None  # the kernel-locked .lock
        self._held_fd: int | None = None  # file mode: the .lock.held we created
        self._token = uuid.uuid4().hex
        self._pid = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release

    def acquire(self) -> FolderLock:
        """Take the lock or raise LockBusy naming the holder."""
        with _registry_guard:
            if self._key in _registry:
                raise LockBusy(self.what, f"this process (pid {os.getpid()})")
            _registry[self._key] = self  # reserved: a second acquire in this process must not open the file
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.mode == "kernel" and not self._acquire_kernel(required=True):
                self.mode, self.why = "file", "kernel locks unsupported here"
            if self.mode == "file":
                if self._fd is None:
                    self._acquire_kernel(required=False)  # at least node-local exclusion where there is any
                self._acquire_file()
                log.info(f"{self.what}: holding {self.held_path.name} (lock file with heartbeat: {self.why})")
        except BaseException:
            self._close_kernel()
            with _registry_guard:
                _registry.pop(self._key, None)
            raise
        self._pid = os.getpid()
        return self

    def _acquire_kernel(self, *, required: bool) -> bool:
        """Take the kernel lock; False when the file system has none. Raises LockBusy when held elsewhere."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            for attempt in range(self.retries):
                try:
                    _kernel_try(fd)
                    break
                except OSError as e:
                    if e.errno in UNSUPPORTED:
                        os.close(fd)
                        return False
                    if e.errno not in BUSY:
                        raise
                    if attempt == self.retries - 1:
                        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
                        raise LockBusy(self.what, holder) from None
                    time.sleep(self.retry_s)
            self._fd = fd
            if required:  # a file-mode holder (another node, or ABLATION_LOCK=file) must block us too
                owner = read_owner(self.held_path)
                why = owner.stale_reason(self.stale_s) if owner is not None else None
                if owner is not None and why is None:
                    raise LockBusy(self.what, owner.describe())
                if owner is not None:
                    self._break(owner, why)
            stamp = f"pid {os.getpid()} on {socket.gethostname()}".encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, stamp, 0)
            return True
        except BaseException:
            self._close_kernel(fd)
            raise

    def _close_kernel(self, fd: int | None = None) -> None:
        fd = self._fd if fd is None else fd
        if fd is not None:
            try:
                os.close(fd)  # drops the POSIX lock
            except OSError:
                pass
        if fd == self._fd:
            self._fd = None

    def _record(self, heartbeat: float) -> bytes:
        """The lock file's one JSON line; its length does not change with the heartbeat."""
        info = {**self._ident, "pid": os.getpid(), "started": self._started, "heartbeat": f"{heartbeat:.3f}", "token": self._token}
        return (json.dumps(info) + "\n").encode()

    def _acquire_file(self) -> None:
        """Create the lock file exclusively, taking over a stale one; start the heartbeat."""
        self._ident = _machine()
        self._started = f"{time.time():.3f}"
        for _ in range(10):  # each pass either creates it, refuses, or removes a stale one
            try:
                fd = os.open(self.held_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                owner = read_owner(self.held_path)
                if owner is None:
                    continue  # released meanwhile
                why = owner.stale_reason(self.stale_s)
                if why is None:
                    raise LockBusy(self.what, owner.describe()) from None
                self._break(owner, why)
                continue
            try:
                os.pwrite(fd, self._record(time.time()), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                self.held_path.unlink(missing_ok=True)
                raise
            self._held_fd = fd
            st = os.fstat(fd)
            self._dev_ino = (st.st_dev, st.st_ino)
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="ablation-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise LockBusy(self.what, "processes racing for it; try again")

    def _break(self, stale: Owner, why: str) -> None:
        """Remove the stale lock file `stale` atomically (rename away, check, delete); never a fresh one."""
        grave = Path(f"{self.held_path}.stale-{socket.gethostname()}-{os.getpid()}-{self._token[:8]}")
        try:
            os.rename(self.held_path, grave)
        except FileNotFoundError:
            return
        moved = read_owner(grave)
        if moved is not None and moved.same(stale):
            grave.unlink(missing_ok=True)
            log.warning(f"{self.what}: took over a stale lock of {stale.describe()}: {why}")
            return
        # Someone broke it first and created a fresh lock, which we just moved away: put it back.
        try:
            os.link(grave, self.held_path)
        except FileExistsError:
            pass  # a third process holds it now; the displaced holder sees it at its next heartbeat
        except OSError:
            if not self.held_path.exists():
                os.rename(grave, self.held_path)
                return
        grave.unlink(missing_ok=True)

    def _beat(self) -> None:
        """Heartbeat thread: rewrite the record (mtime moves too) and check the file is still ours."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                st = os.stat(self.held_path)
                if (st.st_dev, st.st_ino) != self._dev_ino:
                    raise FileNotFoundError
                os.pwrite(self._held_fd, self._record(time.time()), 0)
                os.fsync(self._held_fd)
            except FileNotFoundError:
                if not self.lost:
                    self.lost = True
                    log.error(
                        f"{self.what}: lock file {self.held_path} was taken over by another process (was this one "
                        f"suspended for more than {self.stale_s:.0f} s?); two trainers may now write this run folder"
                    )
            except OSError as e:  # a file server hiccup: try again at the next beat
                log.warning(f"{self.what}: lock heartbeat failed ({e}); retrying")

    def release(self) -> None:
        """Give the lock up (only in the process that took it: a forked child never releases it)."""
        if self._pid != os.getpid():
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._held_fd is not None:
            owner = read_owner(self.held_path)
            if owner is not None and owner.info.get("token") == self._token:
                self.held_path.unlink(missing_ok=True)
            os.close(self._held_fd)
            self._held_fd = None
        self._close_kernel()
        with _registry_guard:
            if _registry.get(self._key) is self:
                del _registry[self._key]
        self._pid = 0

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(path: str | Path, **kw: Any) -> FolderLock:
    """``with hold(path, what="run folder X"):`` ... : the lock, or LockBusy naming its holder."""
    return FolderLock(path, **kw)


def is_held(path: str | Path, *, stale_s: float = STALE_S) -> bool:
    """True while some live process holds the lock at `path` (this one included).

    Never opens the lock file in a process that holds it (that would drop the POSIX lock); probes a
    live file-mode lock, then the kernel lock (a shared lock for an instant, which a starting holder
    retries past).
    """
    key = os.path.realpath(path)
    with _registry_guard:
        if key in _registry:
            return True
    owner = read_owner(_held_path(path))
    if owner is not None and owner.stale_reason(stale_s) is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        _flock_probe(fd)
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in BUSY
    finally:
        os.close(fd)
    return False
