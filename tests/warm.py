"""`python -m ablation ...` in a process forked from a server that has imported torch, torchvision and timm once.

A fresh interpreter spends ~3 s of CPU on those imports before a tiny test run trains for a second or two. The
server (multiprocessing's forkserver, which the local executor uses for the same reason) imports them once per
test process and never runs a torch op, so each child starts as a process of its own would: its own
environment, working directory, import path, argv, output, exit code and interpreter shutdown. Set
ABLATION_TEST_FRESH=1 to run every command in a fresh interpreter instead.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRELOAD = ["ablation.cli", "ablation.train.trainer"]
FAILED_RANK_GRACE_S = 30  # how long the other ranks may take to end on their own once one rank has failed
_context: Any = None


def available() -> bool:
    """True where commands can run in forked children (a forkserver exists and ABLATION_TEST_FRESH is not set)."""
    return os.environ.get("ABLATION_TEST_FRESH", "") in ("", "0") and "forkserver" in multiprocessing.get_all_start_methods()


def _server() -> Any:
    """The forkserver context, its server started (once per test process) with one intra-op thread."""
    global _context
    if _context is None:
        from multiprocessing import forkserver

        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # what the server's OpenMP runtime reads as it loads; each child sets its own
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
        _context = ctx
    return _context


@functools.cache
def _base_path() -> list[str]:
    """sys.path of a fresh interpreter beyond its script folder and PYTHONPATH (the standard library and site-packages)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"], env=env, capture_output=True,
                         text=True, check=True).stdout
    return json.loads(out)


def _child(args: list[str], env: dict[str, str], cwd: str | None, out: str, err: str, base_path: list[str]) -> None:
    """In the forked child: become `python -m ablation ARGS` with this environment and working directory."""
    import atexit

    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    # `python -m` puts the working directory first on the path, then PYTHONPATH's entries.
    # The server's own path is the test process's as it was when the server started, folders tests put there included.
    sys.path[:] = [os.getcwd(), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p), *base_path]
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    from ablation import cli

    sys.argv = [str(Path(cli.__file__).with_name("__main__.py")), *args]
    try:
        code = cli.main(args)
    finally:
        atexit._run_exitfuncs()  # what an interpreter runs as it exits (multiprocessing's children skip it)
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


def run(cmd: list[str], args: list[str], env: dict[str, str], *, cwd: Path | None = None,
        timeout: float | None = 600) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout), cmd being `python -m ablation ARGS`."""
    return run_ranks(cmd, args, [env], cwd=cwd, timeout=timeout)


def torchrun_env(env: dict[str, str], nprocs: int, port: int) -> list[dict[str, str]]:
    """Each worker's environment as `torchrun --standalone --nproc_per_node N` gives it (one node, rank 0 hosts the store)."""
    n, run_id = str(nprocs), f"warm-{os.getpid()}-{port}"
    common = {"WORLD_SIZE": n, "LOCAL_WORLD_SIZE": n, "ROLE_WORLD_SIZE": n, "GROUP_WORLD_SIZE": "1", "GROUP_RANK": "0",
              "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": run_id,
              "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
    return [{**env, **common, "RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)} for r in range(nprocs)]


def free_port() -> int:
    """A TCP port free on this host now (torchrun --standalone picks its rendezvous port the same way)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmd: list[str], args: list[str], envs: list[dict[str, str]], *, cwd: Path | None = None,
              timeout: float | None = 600) -> subprocess.CompletedProcess:
    """`python -m ablation ARGS` once per environment, the processes side by side (one per rank); their outputs joined rank by
    rank with rank 0's last (the lines a test reads, such as the run folder, are rank 0's), and the first non-zero exit code."""
    with tempfile.TemporaryDirectory(prefix="ablation-warm-") as tmp:
        files = [(os.path.join(tmp, f"stdout{r}"), os.path.join(tmp, f"stderr{r}")) for r in range(len(envs))]
        for path in (p for pair in files for p in pair):
            open(path, "w").close()
        where = None if cwd is None else str(cwd)
        procs = [_server().Process(target=_child, args=(args, e, where, *files[r], _base_path()), name=f"ablation{r}")
                 for r, e in enumerate(envs)]
        for proc in procs:
            proc.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = 0  # the exit code of the first rank that failed (before any was killed here)
        while (alive := [p for p in procs if p.is_alive()]) and (deadline is None or time.monotonic() < deadline):
            alive[0].join(0.1)
            if not failed and any(p.exitcode for p in procs):  # as torchrun's agent does: a failed rank ends the others
                failed, end = next(p.exitcode for p in procs if p.exitcode), time.monotonic() + FAILED_RANK_GRACE_S
                deadline = end if deadline is None else min(deadline, end)

        def joined(i: int) -> str:
            return "".join(Path(files[r][i]).read_text(errors="replace") for r in reversed(range(len(envs))))

        for proc in alive:
            proc.kill()
            proc.join()
        if alive and not failed:
            raise subprocess.TimeoutExpired(cmd, timeout, joined(0), joined(1))
        return subprocess.CompletedProcess(cmd, failed or next((p.exitcode for p in procs if p.exitcode), 0), joined(0), joined(1))
