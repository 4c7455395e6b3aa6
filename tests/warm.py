"""`python -m ablation ...` in a process forked from a server that has imported torch, torchvision and timm once.

A fresh interpreter spends ~3 s of CPU on those imports before a tiny test run trains for a second or two. The
server (multiprocessing's forkserver, which the local executor uses for the same reason) imports them once per
test process and never runs a torch op, so each child starts as a process of its own would: its own
environment, working directory, import path, argv, output, exit code and interpreter shutdown. Set
ABLATION_TEST_FRESH=1 to run every command in a fresh interpreter instead.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PRELOAD = ["ablation.cli", "ablation.train.trainer"]
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


def _child(args: list[str], env: dict[str, str], cwd: str | None, out: str, err: str) -> None:
    """In the forked child: become `python -m ablation ARGS` with this environment and working directory."""
    import atexit

    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    # `python -m` puts the working directory first on the path, then PYTHONPATH's entries.
    sys.path[:0] = [os.getcwd(), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
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
        timeout: float = 600) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout), cmd being `python -m ablation ARGS`."""
    with tempfile.TemporaryDirectory(prefix="ablation-warm-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out, err):
            open(path, "w").close()
        proc = _server().Process(target=_child, args=(args, env, None if cwd is None else str(cwd), out, err), name="ablation")
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout, Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
        return subprocess.CompletedProcess(cmd, proc.exitcode, Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))
