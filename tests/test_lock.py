"""The run-folder lock: it ends with the trainer, a dead holder never blocks, and the file fallback for cluster file systems."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from helpers import RUN, ablation_ok, assert_same_run, run_folder

from ablation import lock, rundir
from ablation.errors import AblationError
from ablation.faults import FAULT_ENV

ARGS = ["train", *RUN, "data.workers=2", "checkpoint_every_steps=5", "log_steps=true"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of the run below, never killed."""
    return run_folder(ablation_ok([*ARGS, f"data.root={tiny_data}", "--results", str(tmp_path_factory.mktemp("whole"))], subprocess_env()))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["auto", "file"])
def test_a_killed_trainer_with_loader_workers_restarts_at_once_and_resumes_bitwise(
    kind: str, uninterrupted: Path, tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    # Forked DataLoader workers outlive a SIGKILLed trainer by seconds; the lock must not outlive it with them.
    whole = uninterrupted
    cli_env = {**cli_env, lock.ENV: kind}
    args = [*ARGS, f"data.root={tiny_data}"]

    # The restart is started first and waits at the door with torch imported: it reaches the lock within
    # milliseconds of the kill, while the killed trainer's forked loader workers (~5 s to notice) still live.
    resume = [*args, "--results", str(tmp_path / "resumed")]
    restart = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys, ablation.train.trainer, ablation.cli; sys.stdin.readline(); sys.exit(ablation.cli.main({resume!r}))"],
        env=cli_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Wait for the trainer only (cli() would wait for its pipes, which the workers hold until they exit).
    with open(tmp_path / "killed.out", "w") as out:
        killed = subprocess.Popen([sys.executable, "-m", "ablation", *resume], env={**cli_env, FAULT_ENV: "step:18:kill"}, stdout=out,
                                  stderr=subprocess.STDOUT)
        assert killed.wait(timeout=600) == -9, (tmp_path / "killed.out").read_text()  # last checkpoint: step 15
    stdout, stderr = restart.communicate("go\n", timeout=600)  # at once: no sleep
    assert restart.returncode == 0, stderr
    resumed = Path(stdout.strip().splitlines()[-1])
    if kind == "file":  # the killed trainer's lock file was left behind, and taken over: its pid is gone
        assert f"took over a stale lock of pid {killed.pid} on {socket.gethostname()}" in (resumed / "train.log").read_text()

    starts = json.loads((resumed / "env.json").read_text())["starts"]
    assert [s["resumed_from_step"] for s in starts] == [0, 15]
    assert_same_run(whole, resumed)


# ---------------------------------------------------------------- the lock module, both kinds

# Holds the lock, forks a child that outlives it (as DataLoader workers do), prints the child's pid.
HOLDER = """
import os, sys, time
from ablation import lock
lock.hold(sys.argv[1], heartbeat_s=0.1).acquire()
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""
MODES = ["kernel", "file"]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """ABLATION_LOCK for this process and the subprocesses it starts."""
    monkeypatch.setenv(lock.ENV, request.param)
    return request.param


def start_holder(path: Path) -> tuple[subprocess.Popen, int]:
    """A process holding the lock at `path` and its forked child; returns once the lock is held."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def fake_owner(path: Path, *, heartbeat_age: float, **info: object) -> None:
    """Write a file-mode lock as another holder would have, with its heartbeat `heartbeat_age` seconds ago."""
    then = time.time() - heartbeat_age
    record = {"host": "othernode", "boot_id": "b", "pidns": "p", "pid": 4242, "started": f"{then:.3f}", "heartbeat": f"{then:.3f}",
              "token": "t" * 32}
    held = Path(f"{path}{lock.HELD_SUFFIX}")
    held.write_text(json.dumps({**record, **info}) + "\n")
    os.utime(held, (then, then))


class Captured(list):
    """Messages of the 'ablation' logger while in use (it may not propagate to pytest's caplog)."""

    def __enter__(self) -> Captured:
        import logging

        self.handler = logging.Handler()
        self.handler.emit = lambda r: self.append(r.getMessage())  # type: ignore[method-assign]
        logging.getLogger("ablation").addHandler(self.handler)
        return self

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger("ablation").removeHandler(self.handler)


def test_the_lock_ends_with_its_holder_not_with_its_forked_children(mode: str, tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    proc, child = start_holder(path)
    try:
        assert lock.is_held(path)
        with pytest.raises(lock.LockBusy, match=rf"is in use by pid {proc.pid} on {socket.gethostname()}"):
            lock.hold(path, retries=2).acquire()
        proc.kill()
        proc.wait()
        os.kill(child, 0)  # the forked child still lives and still has the lock file open ...
        assert not lock.is_held(path)
        with lock.hold(path) as held:  # ... and blocks nothing: taken at once
            assert held.mode == mode and lock.is_held(path)
        assert not lock.is_held(path) and not Path(f"{path}{lock.HELD_SUFFIX}").exists()
    finally:
        kill(proc.pid)
        kill(child)


def test_probing_in_the_holding_process_keeps_the_lock(mode: str, tmp_path: Path) -> None:
    # Closing any descriptor of a POSIX-locked file drops the lock: the probe must not open it here.
    path = tmp_path / ".lock"
    probe = [sys.executable, "-c", f"from ablation import lock; print(lock.is_held({str(path)!r}))"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with lock.hold(path):
        assert lock.is_held(path) and lock.is_held(path)
        assert rundir.is_locked(rundir.RunDir(tmp_path))
        assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "True"
        with pytest.raises(lock.LockBusy, match=rf"this process \(pid {os.getpid()}\)"):
            lock.hold(path).acquire()
        assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "True"
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip() == "False"
    assert not lock.is_held(path)


def test_a_live_lock_file_refuses_in_one_line_naming_its_holder(mode: str, tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    fake_owner(path, heartbeat_age=5)  # another node, alive: its heartbeat is recent
    with pytest.raises(lock.LockBusy) as e:
        lock.hold(path, what=f"run folder {tmp_path}").acquire()
    msg = str(e.value)
    assert msg.startswith(f"run folder {tmp_path} is in use by pid 4242 on othernode (lock file, heartbeat 5 s ago)")
    assert "\n" not in msg and lock.is_held(path)


def test_a_lock_file_without_heartbeat_is_taken_over(mode: str, tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    fake_owner(path, heartbeat_age=31)  # a node that died half a minute ago
    assert lock.is_held(path, stale_s=60) and not lock.is_held(path, stale_s=30)
    with pytest.raises(lock.LockBusy, match="othernode"):
        lock.hold(path, stale_s=60).acquire()
    with Captured() as logged, lock.hold(path, stale_s=30) as held:
        owner = lock.read_owner(held.held_path)  # file mode: ours; kernel mode: the stale file is gone
        assert (owner.info["pid"], owner.info["host"]) == (os.getpid(), socket.gethostname()) if mode == "file" else owner is None
    assert any("took over a stale lock of pid 4242 on othernode" in m and "no heartbeat for 31 s" in m for m in logged)
    assert not held.held_path.exists() and not list(tmp_path.glob("*stale*"))


def test_a_lock_file_of_a_dead_pid_on_this_machine_is_taken_over_at_once(mode: str, tmp_path: Path) -> None:
    path = tmp_path / ".lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = lock._machine()
    fake_owner(path, heartbeat_age=0, pid=dead.pid, **me)
    assert not lock.is_held(path)
    with Captured() as logged, lock.hold(path):
        pass
    assert any(f"pid {dead.pid} on {me['host']} is gone" in m for m in logged)
    fake_owner(path, heartbeat_age=0, pid=os.getppid(), **me)  # alive on this machine: refused
    with pytest.raises(lock.LockBusy, match=f"pid {os.getppid()} on {me['host']}"):
        lock.hold(path).acquire()
    fake_owner(path, heartbeat_age=0, pid=dead.pid, **{**me, "boot_id": "before-a-reboot"})  # pid numbers of another boot
    with pytest.raises(lock.LockBusy):
        lock.hold(path).acquire()


def test_a_killed_file_mode_holder_shows_as_not_running_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ablation.sweep import status

    monkeypatch.setenv(lock.ENV, "file")
    proc, child = start_holder(tmp_path / rundir.LOCK)
    try:
        assert status.run_state(tmp_path, 2, None, None)[0] == "running"
        held = lock.read_owner(tmp_path / f"{rundir.LOCK}{lock.HELD_SUFFIX}")
        time.sleep(0.5)  # the heartbeat thread rewrites the record every 0.1 s
        assert lock.read_owner(tmp_path / f"{rundir.LOCK}{lock.HELD_SUFFIX}").heartbeat > held.heartbeat
        proc.kill()
        proc.wait()
        assert status.run_state(tmp_path, 2, None, None)[0] != "running"
    finally:
        kill(proc.pid)
        kill(child)


def test_a_holder_whose_lock_file_was_taken_notices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lock.ENV, "file")
    path = tmp_path / ".lock"
    with Captured() as logged, lock.hold(path, heartbeat_s=0.05) as held:
        os.rename(held.held_path, tmp_path / "moved")
        fake_owner(path, heartbeat_age=0)
        deadline = time.time() + 10
        while not held.lost and time.time() < deadline:
            time.sleep(0.05)
        assert held.lost
    assert any("was taken over by another process" in m for m in logged)
    assert lock.read_owner(held.held_path).info["host"] == "othernode"  # release left the other's lock alone


def test_file_systems_without_kernel_locks_fall_back_to_the_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl

    def enosys(*_a: object) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")  # Lustre mounted with noflock

    monkeypatch.delenv(lock.ENV, raising=False)
    monkeypatch.setattr(fcntl, "flock", enosys)
    monkeypatch.setattr(fcntl, "lockf", enosys)
    with lock.hold(tmp_path / ".lock") as held:
        assert held.mode == "file" and held.held_path.exists() and lock.is_held(tmp_path / ".lock")
    assert not held.held_path.exists()
    monkeypatch.setenv(lock.ENV, "sometimes")
    with pytest.raises(AblationError, match="ABLATION_LOCK='sometimes': expected auto, kernel or file"):
        lock.hold(tmp_path / ".lock")


MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:40 / /lustre rw,relatime shared:2 - lustre 10.0.0.1@o2ib:/scratch rw,localflock,lazystatfs
41 22 0:41 / /lustre/flocked rw,relatime shared:3 - lustre 10.0.0.1@o2ib:/fast rw,flock,lazystatfs
42 22 0:42 / /lustre/none rw,relatime shared:4 - lustre 10.0.0.1@o2ib:/none rw,noflock
43 22 0:43 / /home rw,relatime shared:5 - nfs4 srv:/home rw,vers=4.2,local_lock=none,addr=10.0.0.2
44 22 0:44 / /old rw,relatime shared:6 - nfs srv:/old rw,vers=3,nolock,addr=10.0.0.2
45 22 0:45 / /beegfs rw,relatime shared:7 - beegfs beegfs_nodev rw,cfgFile=/etc/beegfs/beegfs-client.conf
46 22 0:46 / /gpfs rw,relatime shared:8 - gpfs gpfs0 rw
47 22 0:47 / /my\040runs rw,relatime shared:9 - fuse.sshfs me@login:/runs rw,user_id=0
"""


@pytest.mark.parametrize(
    ("path", "fstype", "mode"),
    [
        ("/tmp/runs/x/.lock", "ext4", "kernel"),
        ("/lustre/runs/x/.lock", "lustre", "file"),  # localflock: per node
        ("/lustre/flocked/x/.lock", "lustre", "kernel"),
        ("/lustre/none/x/.lock", "lustre", "file"),
        ("/lustreish/x/.lock", "ext4", "kernel"),  # a prefix of the name is not a mount above it
        ("/home/me/runs/.lock", "nfs4", "kernel"),
        ("/old/runs/.lock", "nfs", "file"),
        ("/beegfs/runs/.lock", "beegfs", "file"),
        ("/gpfs/runs/.lock", "gpfs", "kernel"),
        ("/my runs/x/.lock", "fuse.sshfs", "file"),
    ],
)
def test_lock_kind_follows_the_mount(path: str, fstype: str, mode: str) -> None:
    m = lock.mount_of(path, MOUNTINFO)
    assert m is not None and m.fstype == fstype
    assert ("file" if lock._file_mode_reason(m) else "kernel") == mode
