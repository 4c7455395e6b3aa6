"""The local executor: a sweep's runs trained on this machine, `array_parallelism` at a time, in the foreground.

Each run is a process of its own, forked from a forkserver that imported torch once (several processes per
run start under torchrun instead), given its share of the cores (OMP_NUM_THREADS and ablation.cpus.CPUS_ENV),
its output appended to logs/<run id>.out and echoed prefixed; a failed run goes again, up to profile.retries times.

Why not submitit's own executors (submitit 1.5, submitit/local/): LocalExecutor starts every submitted job at
once as a controller process of its own (`python -m submitit.core._submit`): nothing bounds how many run
together, so a sweep's runs would all share the cores at once, none told its share; each job is a fresh
interpreter that imports torch again (no forkserver preload: seconds of CPU per run, a tenth of a demo run);
it requeues only a job that exits with its requeue code after its own timeout signal (max_num_timeout),
not a failed run `retries` times; and the output stays in its job folder, not echoed as the runs go.
DebugExecutor runs a job in the calling process, only when its result is asked for, and drops into pdb
post-mortem when it raises: for debugging one function, not for a sweep's unattended runs (the `debug`
executor here runs TrainJob in-process, one run after another).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ablation import config, sweepdir
from ablation.cpus import CPUS_ENV, usable_cores
from ablation.sweep import status
from ablation.sweep.cluster import Profile


def run_local(sweep_dir: Path, run_ids: list[str], paths: list[str], runs_root: str, profile: Profile,
              on_line: Callable[[str], None]) -> int:
    """Run `ablation train` processes on this machine, `array_parallelism` at a time, in the foreground."""
    parallel = max(1, min(profile.array_parallelism, len(run_ids)))
    # Every process started here shares this process's cores: each gets its share as threads and as its
    # CPU budget (ABLATION_CPUS), so a child under SLURM does not take the whole task's CPUs for itself.
    cores = max(1, usable_cores(1)[0] // (parallel * profile.processes_per_job))
    logs = sweepdir.logs_folder(sweep_dir)
    logs.mkdir(exist_ok=True)
    # Longest first (most optimizer steps: more epochs, smaller global batch), so no core idles at the end.
    order = sorted(zip(run_ids, paths), key=lambda item: _expected_steps(item[1]), reverse=True)
    queue = list(enumerate(order, 1))
    running: list[tuple[_Child, str]] = []
    failed, done, t0 = 0, 0, time.monotonic()
    retried: dict[str, int] = {}
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), CPUS_ENV: str(cores)}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                i, (rid, path) = queue.pop(0)
                proc = _Child(path, runs_root, env, logs / f"{rid}.out", f"[{i}/{len(run_ids)}] ", on_line, profile.processes_per_job)
                sweepdir.record_jobs(sweep_dir, [{"run_id": rid, "executor": "local", "job_id": f"local-{proc.pid}",
                                                  "submitted_at": sweepdir.now()}])
                running.append((proc, rid))
            time.sleep(0.2)
            for item in list(running):
                proc, rid = item
                if proc.poll() is None:
                    continue
                proc.finish()
                running.remove(item)
                tries = retried.get(rid, 0)
                if proc.returncode not in (0, 3) and tries < profile.retries and status.is_failed(Path(runs_root) / rid):
                    retried[rid] = tries + 1  # a failed run goes again at once, up to profile.retries times
                    queue.insert(0, next((i, (r, p)) for i, (r, p) in enumerate(order, 1) if r == rid))
                    on_line(f"{rid} failed (exit {proc.returncode}); retry {tries + 1} of {profile.retries}")
                    continue
                done += 1
                failed += proc.returncode not in (0, 3)  # 3: diverged, a result
                left = len(queue) + len(running)
                eta = (time.monotonic() - t0) / done * left / parallel if left else 0
                on_line(f"{done}/{len(run_ids)} runs done ({rid}: exit {proc.returncode})" + (f"; ETA ~{eta:.0f}s" if left else ""))
    except KeyboardInterrupt:
        for proc, _ in running:
            proc.send_signal(signal.SIGINT)
        for proc, _ in running:
            proc.wait()
            proc.finish()
        raise
    return failed


def _expected_steps(config_path: str) -> float:
    """Optimizer steps per training image of a run: its relative cost when the data is the same."""
    cfg = config.load(config_path)
    return cfg.epochs / (cfg.gpus * cfg.batch_per_gpu)


PRELOAD = ["ablation.train.trainer"]  # what training a run imports: torch, torchvision, timm


def _forkserver() -> Any:
    """The multiprocessing context whose server has imported PRELOAD once; None where there is no forkserver.

    `python -m ablation train` spends ~6 s of CPU importing torch, torchvision and timm before it trains:
    a tenth of a demo run. A child forked from a server that imported them once starts in milliseconds, as
    a fresh process all the same (nothing of the server's state but imported modules; no torch op has run).
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_local_server() -> None:
    """Start the local executor's forkserver now, without waiting: its imports then overlap the caller's
    own work (the demo generates its data meanwhile) instead of delaying the first runs."""
    if _forkserver() is not None:
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _child_main(config_path: str, runs_root: str, environ: dict[str, str], log_path: str) -> None:
    """In a forkserver child: train the run with the environment, output and exit code that
    `ablation train CONFIG --results RUNS_ROOT` would have as a process of its own."""
    os.environ.clear()
    os.environ.update(environ)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # line-buffered, as the parent tails the file
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    from ablation.errors import exit_status
    from ablation.train.trainer import train_command

    sys.exit(exit_status(lambda: train_command(config.load(config_path), runs_root)))


class _Child:
    """One run trained by the local executor (as `ablation train CONFIG --results RUNS_ROOT`), its output appended
    to its log file and echoed.

    A single process is forked from the preloaded forkserver; several (processes_per_job > 1) start under
    torchrun as a new program. Either way the output goes to the log file, which a thread echoes, prefixed.
    """

    def __init__(self, config_path: str, runs_root: str, env: dict[str, str], log: Path, prefix: str, on_line: Callable[[str], None],
                 processes: int) -> None:
        offset = log.stat().st_size if log.exists() else 0  # a retry appends to the same log
        ctx = _forkserver() if processes == 1 else None
        if ctx is not None:
            self._proc: Any = ctx.Process(target=_child_main, args=(config_path, runs_root, env, str(log)), name="ablation train")
            self._proc.start()
        else:
            argv = ["train", config_path, "--results", runs_root]
            cmd = [sys.executable, "-m", "ablation", *argv]
            if processes > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", str(processes), "-m", "ablation", *argv]
            with open(log, "ab") as out:
                self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.pid: int = self._proc.pid
        self._ended = threading.Event()
        self._echo = threading.Thread(target=_tail, args=(log, offset, prefix, on_line, self._ended), daemon=True)
        self._echo.start()

    def poll(self) -> int | None:
        """The exit code (negative: killed by that signal), or None while it runs."""
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.poll()
        return None if self._proc.is_alive() else self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def send_signal(self, sig: int) -> None:
        """Signal the process (torchrun forwards it to its workers)."""
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        """Wait for the exit; its code."""
        if isinstance(self._proc, subprocess.Popen):
            return self._proc.wait()
        self._proc.join()
        return self._proc.exitcode

    def finish(self) -> None:
        """After the exit: echo what is left of the log."""
        self._ended.set()
        self._echo.join()


def _tail(log: Path, offset: int, prefix: str, on_line: Callable[[str], None], ended: threading.Event) -> None:
    """Echo the lines appended to `log` after `offset`, prefixed, until `ended` is set and all are read."""
    with open(log, "a+b") as f:
        f.seek(offset)
        pending = b""
        while True:
            last = ended.is_set()  # read once more after the process has ended: what it wrote last
            chunk = f.read()
            if chunk:
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    on_line(prefix + line.decode("utf-8", "replace").rstrip())
            elif last:
                if pending:
                    on_line(prefix + pending.decode("utf-8", "replace").rstrip())
                return
            else:
                time.sleep(0.1)
