"""Launch a sweep: write its folder (laid out as ablation.sweepdir says), decide what runs, submit through an executor.

Executors: `slurm` (submitit job arrays, one DDP job per run, checkpoint-and-requeue on the
pre-timeout signal), `local` (this machine, runs `ablation train` processes, N at a time, in the
foreground, each forked from a server that imported torch once), `debug` (in this process, one after another).
"""

from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from ablation import config, rundir, sweepdir
from ablation.sweep import status
from ablation.cpus import CPUS_ENV, usable_cores
from ablation.sweep.cluster import Profile, check_run_fits, executor_parameters, interpolate
from ablation.config import IMAGENET_TRAIN_IMAGES, RunConfig
from ablation.errors import AblationError
from ablation.sweep.spec import Sweep

# What re-running a sweep does with a run in each state.
ACTIONS = {
    "new": "submit",
    "stopped": "resume",
    "failed": "retry",  # only with --retry-failed
    "ok": "skip",
    "diverged": "skip",
    "running": "skip",
    "pending": "skip",
    "requeued": "skip",
}


def _now() -> str:
    """UTC time for records."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prepare(sweep: Sweep, results: Path, overrides: list[str]) -> Path:
    """Write the sweep folder (spec, manifest, run configs, links to the shared run folders)."""
    sweep_dir = results / sweep.name
    (sweep_dir / sweepdir.CONFIGS).mkdir(parents=True, exist_ok=True)
    (sweep_dir / sweepdir.RUNS_LINKS).mkdir(exist_ok=True)
    sweepdir.runs_root(results).mkdir(parents=True, exist_ok=True)
    rundir.write_text(sweep_dir / sweepdir.SPEC, yaml.safe_dump({"spec": dict(sweep.spec), "overrides": overrides}, sort_keys=False))
    runs = []
    for run in sweep.runs:
        cfg_path = sweep_dir / sweepdir.config_file(run.run_id)
        rundir.write_text(cfg_path, yaml.safe_dump({"run_id": run.run_id, **config.to_dict(run.config)}, sort_keys=False))
        link = sweepdir.run_link(sweep_dir, run.run_id)
        if not link.is_symlink():
            link.symlink_to(sweepdir.link_target(run.run_id))
        runs.append({"run_id": run.run_id, "axes": dict(run.axes), "epochs": run.config.epochs, "config": sweepdir.config_file(run.run_id)})
    keep = {r["run_id"] for r in runs}
    for link in (sweep_dir / sweepdir.RUNS_LINKS).iterdir():
        if link.is_symlink() and link.name not in keep:
            link.unlink()  # a run no longer in the spec; its shared folder stays
    manifest = {"name": sweep.name, "description": sweep.description, "axes": list(sweep.axes), "runs": runs}
    rundir.write_json(sweep_dir / sweepdir.MANIFEST, manifest)
    return sweep_dir


def plan(sweep: Sweep, results: Path, retry_failed: bool) -> list[tuple[status.RunState, str]]:
    """Each run's state and what launching the sweep does with it (reads files only; writes nothing)."""
    runs = [{"run_id": r.run_id, "axes": dict(r.axes), "epochs": r.config.epochs} for r in sweep.runs]
    jobs = sweepdir.latest_jobs(results / sweep.name)
    out = []
    for s in status.states(runs, lambda rid: sweepdir.runs_root(results) / rid, jobs):
        action = ACTIONS[s.state]
        if action == "retry" and not retry_failed:
            action = "skip (failed: use --retry-failed)"
        out.append((s, action))
    return out


def to_submit(planned: list[tuple[status.RunState, str]]) -> list[str]:
    """The run ids of a plan that launching submits: new runs, stopped ones (resumed) and failed ones being retried."""
    return [s.run_id for s, action in planned if action in ("submit", "resume", "retry")]


def launch_sweep(sweep: Sweep, results: Path, overrides: list[str], profile: Profile, todo: list[str],
                 *, on_line: Callable[[str], None] = print) -> tuple[Path, int]:
    """Write the sweep folder and submit the runs `todo` through the profile's executor (nothing when empty):
    (the sweep folder, how many runs failed locally)."""
    sweep_dir = prepare(sweep, results, overrides)
    failed = submit(sweep_dir, todo, profile, results, on_line=on_line) if todo else 0
    return sweep_dir, failed


def train_images(cfg: RunConfig) -> int:
    """Training images for estimates: counted when the dataset is here, else ImageNet's."""
    train = Path(cfg.data.root) / "train"
    if not train.is_dir():
        return IMAGENET_TRAIN_IMAGES
    return sum(1 for d in os.scandir(train) if d.is_dir() for f in os.scandir(d.path) if f.is_file())


def _run_docs(runs_root: Path) -> Iterator[tuple[dict[str, Any], rundir.RunDir]]:
    """(config.yaml, run folder) of each run folder under runs_root (unreadable configs skipped)."""
    for folder in sorted(runs_root.glob("*/")):
        rd = rundir.RunDir(folder)
        try:
            doc = rundir.read_config(rd.config) if rd.config.is_file() else None
        except (OSError, yaml.YAMLError, AblationError):
            continue
        if isinstance(doc, dict):
            yield doc, rd


def _same_model(doc: dict[str, Any], model: str, image_size: int) -> bool:
    """True when a run's config.yaml has this model and image size."""
    m, d = doc.get("model"), doc.get("data")
    return isinstance(m, dict) and isinstance(d, dict) and m.get("name") == model and d.get("image_size") == image_size


def _runs_like(runs_root: Path, cfg: RunConfig) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(env.json, metrics rows) of the run folders under runs_root with the same model and image size (damaged ones skipped)."""
    for doc, rd in _run_docs(runs_root):
        if not _same_model(doc, cfg.model.name, cfg.data.image_size):
            continue
        try:
            yield rundir.read_json(rd.env) or {}, rundir.read_jsonl(rd.metrics)
        except (OSError, AblationError):
            continue


def _measured(runs_root: Path, models: set[tuple[str, int]]) -> dict[tuple[str, int, int, int], tuple[list[float], int]]:
    """Per-process images/s of every finished epoch of the runs of these (model, image size), by
    (model, image size, batch_per_gpu, GPUs per process): (the figures, how many runs gave them)."""
    out: dict[tuple[str, int, int, int], tuple[list[float], int]] = {}
    if not runs_root.is_dir():
        return out
    for doc, rd in _run_docs(runs_root):
        key = next(((m, i) for m, i in models if _same_model(doc, m, i)), None)
        batch = doc.get("batch_per_gpu")
        if key is None or not isinstance(batch, int):
            continue
        try:
            env, rows = rundir.read_json(rd.env) or {}, rundir.read_jsonl(rd.metrics)
        except (OSError, AblationError):
            continue
        procs = env.get("processes") or 1
        gpp = env.get("gpus_per_process") or max(1, (doc.get("gpus") or procs) // procs)
        figures = [r["images_per_s"] / procs for r in rows if isinstance(r.get("images_per_s"), (int, float)) and r["images_per_s"] > 0]
        if figures:
            old, n = out.get((*key, batch, gpp), ([], 0))
            out[(*key, batch, gpp)] = (old + figures, n + 1)
    return out


def _median(xs: list[float]) -> float:
    """The median (upper middle for an even count, as the estimates always took it)."""
    return sorted(xs)[len(xs) // 2]


# The GPU benchmark's records (benchmarks/gpu.jsonl appends them): one JSON line per measurement, of which
# the estimates read {"model": "resnet50", "image_size": 224, "batch_per_gpu": 32, "images_per_s_per_gpu": 1210.0,
# "device": "NVIDIA A100-SXM4-80GB"}, and "norm" ("bn", "gn", ...) where the record has one: the run's norm's
# records when there are any, else those without a norm. Found in ./benchmarks/results/ or in the repository's.
GPU_RECORDS = Path("benchmarks") / "results" / "gpu.jsonl"


def gpu_records_path() -> Path | None:
    """The GPU benchmark's records here (./benchmarks/results/gpu.jsonl) or in the repository, else None."""
    for p in (GPU_RECORDS, Path(__file__).resolve().parents[2] / GPU_RECORDS):
        if p.is_file():
            return p
    return None


def gpu_benchmark_table(records: list[dict[str, Any]], cfg: RunConfig, gpu: str | None = None) -> tuple[dict[int, float], str]:
    """The records' images/s per GPU by per-GPU batch for this run's model and image size (median per batch),
    and the devices they come from; only records of `gpu` (a substring of the device name) when given."""
    like = []
    for r in records:
        thr, batch = r.get("images_per_s_per_gpu"), r.get("batch_per_gpu")
        if r.get("model") != cfg.model.name or r.get("image_size") != cfg.data.image_size:
            continue
        if not isinstance(batch, int) or batch < 1 or not isinstance(thr, (int, float)) or not thr > 0:
            continue
        if gpu and gpu.lower() not in str(r.get("device", "")).lower():
            continue
        like.append(r)
    same_norm = [r for r in like if r.get("norm") == cfg.norm.name]
    like = same_norm or [r for r in like if r.get("norm") is None]  # another norm's records never stand in
    by_batch: dict[int, list[float]] = {}
    for r in like:
        by_batch.setdefault(r["batch_per_gpu"], []).append(float(r["images_per_s_per_gpu"]))
    devices = sorted({str(r.get("device", "?")) for r in like})
    return {b: _median(v) for b, v in sorted(by_batch.items())}, ", ".join(devices)


def throughput(cfg: RunConfig, profile: Profile, measured: dict[tuple[str, int, int, int], tuple[list[float], int]], records: list[dict[str, Any]]) -> tuple[float, str, str] | None:
    """(images/s per process, where it came from, '' | 'interpolated' | 'extrapolated') for one run, or None.

    Measured runs of the same model, image size, per-GPU batch and GPUs per process come first, then the
    GPU benchmark's records, then the profile's figure; a table (records, profile) is interpolated in log
    batch between its sizes, and a source that could only extrapolate gives way to one that need not.
    A process standing in for k GPUs runs k x batch_per_gpu images per step: the tables are read at that batch.
    """
    gpp = cfg.gpus // profile.processes(cfg)
    batch = cfg.batch_per_gpu * gpp
    figures, n = measured.get((cfg.model.name, cfg.data.image_size, cfg.batch_per_gpu, gpp), ([], 0))
    if figures:
        return _median(figures), f"measured on {n} run(s)", ""
    found = []
    table, devices = gpu_benchmark_table(records, cfg, profile.gpu)
    if table:
        thr, how = interpolate(table, batch)
        found.append((thr, f"GPU benchmark ({devices})", how))
    at = profile.throughput_at(batch)
    if at:
        what = "table" if isinstance(profile.throughput_images_per_s, Mapping) else "figure"
        found.append((at[0], f"profile {profile.name}'s {what}", at[1]))
    return next((f for f in found if f[2] != "extrapolated"), found[0] if found else None)


def estimate_hours(runs: list[RunConfig], profile: Profile, runs_root: Path, gpu_records: Path | None = None) -> tuple[float | None, str]:
    """Device-hours (GPU-hours on GPU profiles) for these runs, and the throughput each per-GPU batch size used with its source.

    gpu_records: the GPU benchmark's records (default: gpu_records_path()).
    """
    if not runs:
        return 0.0, "nothing to run"
    measured = _measured(runs_root, {(c.model.name, c.data.image_size) for c in runs})
    path = gpu_records or gpu_records_path()
    try:
        records = rundir.read_jsonl(path) if path else []
    except (OSError, AblationError) as e:
        print(f"warning: GPU benchmark records left out: {e}", file=sys.stderr)
        records = []
    images: dict[str, int] = {}
    hours = 0.0
    used: dict[tuple[str, int, int], tuple[float, str, str]] = {}
    for cfg in runs:
        got = throughput(cfg, profile, measured, records)
        if got is None:
            return None, (
                f"no throughput figure for {cfg.model.name} at {cfg.batch_per_gpu} images per GPU: set throughput_images_per_s in the profile "
                "(a number, or a table by per-GPU batch size), record GPU benchmarks (benchmarks/results/gpu.jsonl) or run one job first"
            )
        if cfg.data.root not in images:
            images[cfg.data.root] = train_images(cfg)
        hours += cfg.epochs * images[cfg.data.root] / got[0] / 3600
        used[(cfg.model.name, cfg.data.image_size, cfg.batch_per_gpu)] = got
    return hours, describe_throughputs(used, "GPU" if profile.gpus_per_node else "process")


def describe_throughputs(used: dict[tuple[str, int, int], tuple[float, str, str]], per: str) -> str:
    """'images/s per GPU by per-GPU batch: 32: 400, 2: 150 (profile x's table); 8: 330 (measured on 2 run(s))'."""
    models = len({(m, i) for m, i, _ in used})
    groups: dict[str, list[str]] = {}
    for (model, image, batch), (thr, source, how) in sorted(used.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        label = f"{model}@{image} " if models > 1 else ""
        groups.setdefault(source, []).append(f"{label}{batch}: {thr:.0f}" + (f" {how}" if how else ""))
    return f"images/s per {per} by per-GPU batch: " + "; ".join(f"{', '.join(items)} ({source})" for source, items in groups.items())


# Write speed assumed for a checkpoint before any run has measured one: a busy shared file system.
ASSUMED_WRITE_MB_S = 50.0


def stop_seconds(runs_root: Path, cfg: RunConfig, checkpoint_bytes: int) -> tuple[float, str]:
    """Seconds from a stop signal to a written checkpoint: the slowest measured on like runs, else from the checkpoint's size."""
    measured = [s["signal_to_checkpoint_s"] for env, _ in _runs_like(runs_root, cfg) for s in env.get("starts", []) if s.get("signal_to_checkpoint_s")]
    if measured:
        return max(measured), f"measured on {len(measured)} earlier stop(s) of {cfg.model.name}"
    mb = checkpoint_bytes / 1e6
    return mb / ASSUMED_WRITE_MB_S, f"a {cfg.model.name} checkpoint is ~{mb:.0f} MB; at an assumed {ASSUMED_WRITE_MB_S:.0f} MB/s"


def signal_delay_warning(profile: Profile, cfgs: list[RunConfig], runs_root: Path, checkpoint_bytes: Callable[[RunConfig], int]) -> str | None:
    """A warning when the profile's pre-timeout signal comes too late for a checkpoint to be written, else None."""
    if profile.executor != "slurm" or not cfgs:
        return None
    by_model = {(c.model.name, c.data.image_size): c for c in cfgs}
    seconds, why = max(stop_seconds(runs_root, c, checkpoint_bytes(c)) for c in by_model.values())
    if profile.signal_delay_s >= seconds:
        return None
    return (
        f"warning: profile {profile.name}: signal_delay_s={profile.signal_delay_s} is shorter than the ~{seconds:.1f} s a checkpoint takes "
        f"({why}); a job at its time limit may be killed before it saves: raise signal_delay_s"
    )


# ---------------------------------------------------------------- the job


class TrainJob:
    """One run as a submitit job: DDP under srun, checkpoint-and-requeue on SLURM's stop signals.

    SLURM sends SIGUSR2 before the time limit and SIGTERM on preemption. submitit's own SIGUSR2 handler
    would checkpoint by interrupting the main thread anywhere, possibly in the middle of an optimizer
    step, and it ignores SIGTERM. So the job routes both signals to a flag; the trainer checkpoints at
    its next step boundary (all ranks agree on which), and then SIGUSR2 is handed back to submitit,
    which calls checkpoint() and requeues the job. The requeued job resumes from that checkpoint.

    A run that fails (set-up or training) is requeued the same way up to `retries` times; after that
    it stays failed. The count travels with the requeued job, and failures.jsonl keeps the history.
    """

    def __init__(self, retries: int = 0, failures: int = 0) -> None:
        self.retries, self.failures = retries, failures
        self._retry = False

    def __call__(self, config_path: str, runs_root: str) -> dict[str, Any]:
        """Train the run described by config_path under runs_root."""
        from ablation.signals import StopRequest
        from ablation.train.trainer import run_training

        cfg = config.load(config_path)
        stop = StopRequest().install()
        submitit_handler = stop.previous(signal.SIGUSR2)
        try:
            final = run_training(cfg, runs_root, stop)
        except Exception as e:
            if callable(submitit_handler) and self.failures < self.retries and _failed(Path(runs_root) / config.run_id(cfg)):
                print(f"ablation: run failed ({type(e).__name__}: {e}); requeueing, retry {self.failures + 1} of {self.retries}", file=sys.stderr, flush=True)
                self._retry = True
                _hand_to(submitit_handler, stop)  # the process group is already left
            raise
        if final.get("status") == "interrupted" and callable(submitit_handler):
            _hand_to(submitit_handler, stop)
        return final

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the trainer has already saved its state, so requeue the same call."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.retries, self.failures + self._retry), *args, **kwargs)


def _hand_to(submitit_handler: Any, stop: Any) -> None:
    """Give SIGUSR2 back to submitit and raise it: its handler calls checkpoint(), requeues and exits."""
    stop.restore()
    signal.signal(signal.SIGUSR2, submitit_handler)
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(30)  # the handler runs at the next bytecode and exits; never reached on rank 0


def _failed(folder: Path) -> bool:
    """True when the run folder says the run failed (not a full disk, not a stop)."""
    try:
        return (rundir.RunDir(folder).final_status() or {}).get("status") == "failed"
    except rundir.CorruptFile:
        return False


# ---------------------------------------------------------------- executors


def submit(sweep_dir: Path, run_ids: list[str], profile: Profile, results: Path, *, on_line: Callable[[str], None] = print) -> int:
    """Submit these runs of the sweep through the profile's executor; returns how many failed locally."""
    manifest = sweepdir.load_manifest(sweep_dir)
    by_id = {r["run_id"]: r for r in manifest["runs"]}
    paths = [str(sweep_dir / by_id[r]["config"]) for r in run_ids]
    runs_root = str(sweepdir.runs_root(results))
    if profile.executor == "slurm":
        _submit_slurm(sweep_dir, run_ids, paths, runs_root, profile, manifest["name"], on_line)
        return 0
    if profile.executor == "debug":
        return _run_debug(sweep_dir, run_ids, paths, runs_root, profile, on_line)
    return _run_local(sweep_dir, run_ids, paths, runs_root, profile, on_line)


def _run_debug(sweep_dir: Path, run_ids: list[str], paths: list[str], runs_root: str, profile: Profile, on_line: Callable[[str], None]) -> int:
    """Train each run in this process, one after another (a failed run again, up to profile.retries times)."""
    failed = 0
    for i, (rid, path) in enumerate(zip(run_ids, paths), 1):
        sweepdir.record_jobs(sweep_dir, [{"run_id": rid, "executor": "debug", "job_id": f"debug-{os.getpid()}-{i}", "submitted_at": _now()}])
        on_line(f"[{i}/{len(run_ids)}] {rid}")
        for attempt in range(profile.retries + 1):
            try:
                TrainJob()(path, runs_root)
                break
            except Exception as e:  # recorded as 'failed' in the run folder
                on_line(f"[{i}/{len(run_ids)}] {rid} failed: {type(e).__name__}: {e}")
                if attempt == profile.retries or not _failed(Path(runs_root) / rid):
                    failed += 1
                    break
                on_line(f"[{i}/{len(run_ids)}] {rid}: retry {attempt + 1} of {profile.retries}")
    return failed


def _run_local(sweep_dir: Path, run_ids: list[str], paths: list[str], runs_root: str, profile: Profile, on_line: Callable[[str], None]) -> int:
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
                sweepdir.record_jobs(sweep_dir, [{"run_id": rid, "executor": "local", "job_id": f"local-{proc.pid}", "submitted_at": _now()}])
                running.append((proc, rid))
            time.sleep(0.2)
            for item in list(running):
                proc, rid = item
                if proc.poll() is None:
                    continue
                proc.finish()
                running.remove(item)
                tries = retried.get(rid, 0)
                if proc.returncode not in (0, 3) and tries < profile.retries and _failed(Path(runs_root) / rid):
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
    """One run trained by the local executor (as `ablation train CONFIG --results RUNS_ROOT`), its output appended to its log file and echoed.

    A single process is forked from the preloaded forkserver; several (processes_per_job > 1) start under
    torchrun as a new program. Either way the output goes to the log file, which a thread echoes, prefixed.
    """

    def __init__(self, config_path: str, runs_root: str, env: dict[str, str], log: Path, prefix: str, on_line: Callable[[str], None], processes: int) -> None:
        offset = log.stat().st_size if log.exists() else 0  # a retry appends to the same log
        ctx = _forkserver() if processes == 1 else None
        if ctx is not None:
            self._proc: Any = ctx.Process(target=_child_main, args=(config_path, runs_root, env, str(log)), name="ablation train")
            self._proc.start()
        else:
            argv = ["train", config_path, "--results", runs_root]
            cmd = [sys.executable, "-m", "ablation", *argv]
            if processes > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "ablation", *argv]
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


def _slurm_parameters(profile: Profile, cfg: RunConfig, name: str, array_size: int, after: str | None) -> dict[str, Any]:
    """submitit AutoExecutor parameters of one job array; `after`: an array job id to wait for."""
    params = executor_parameters(profile, cfg, name)
    params["slurm_array_parallelism"] = min(profile.array_parallelism, array_size)
    if after:
        params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}), "dependency": f"afterany:{after}"}
    return params


def slurm_executor(sweep_dir: Path, profile: Profile, cfg: RunConfig, name: str, array_size: int, after: str | None = None) -> Any:
    """A submitit SLURM executor set up for one run's job geometry; `after`: an array job id to wait for."""
    import submitit

    ex = submitit.AutoExecutor(folder=sweepdir.slurm_folder(sweep_dir), cluster="slurm", slurm_max_num_timeout=profile.max_requeues)
    ex.update_parameters(**_slurm_parameters(profile, cfg, name, array_size, after))
    return ex


def _submit_slurm(sweep_dir: Path, run_ids: list[str], paths: list[str], runs_root: str, profile: Profile, name: str, on_line: Callable[[str], None]) -> None:
    """One job array per job geometry, split at the cluster's maximum array size.

    Each array after the first waits for the one before it (afterany), so the profile's
    array_parallelism bounds the whole sweep, not each piece of it.
    """
    groups: dict[tuple[int, int], list[tuple[str, str, RunConfig]]] = {}
    for rid, path in zip(run_ids, paths):
        cfg = config.load(path)
        check_run_fits(profile, cfg, rid)
        groups.setdefault(profile.geometry(cfg), []).append((rid, path, cfg))
    previous: str | None = None
    for (nodes, tasks), items in groups.items():
        for start in range(0, len(items), profile.max_array_size):
            chunk = items[start : start + profile.max_array_size]
            ex = slurm_executor(sweep_dir, profile, chunk[0][2], f"ablation-{name}", len(chunk), after=previous)
            jobs = ex.map_array(TrainJob(profile.retries), [p for _, p, _ in chunk], [runs_root] * len(chunk))
            sweepdir.record_jobs(sweep_dir, [{"run_id": rid, "executor": "slurm", "job_id": j.job_id, "submitted_at": _now()} for (rid, _, _), j in zip(chunk, jobs)])
            array_id = jobs[0].job_id.split("_")[0]
            waits = f", after array {previous}" if previous else ""
            on_line(f"submitted array {array_id}: {len(chunk)} jobs x {nodes} node(s) x {tasks} task(s) (throttle {min(profile.array_parallelism, len(chunk))}{waits})")
            previous = array_id


def sbatch_script(sweep_dir: Path, profile: Profile, cfg: RunConfig, name: str) -> str:
    """The sbatch script submitit would write for one job (for --print-sbatch); needs no SLURM here.

    Planning happens before logging into the cluster, but submitit's SlurmExecutor (and so the
    AutoExecutor that submits) refuses to exist where `srun` is not on PATH: its constructor checks
    affinity(). So the script comes from a SlurmExecutor whose affinity() says "available" without
    looking, given the parameters slurm_executor's AutoExecutor would hand it. submitit (1.5) has no
    public way to render a script; the three private names used here are pinned by
    tests/test_sweep.py, which checks this text against the file submitit writes when it submits.
    """
    import submitit

    class ScriptOnlySlurmExecutor(submitit.SlurmExecutor):
        """Renders sbatch scripts; never asked to submit (sbatch would be looked up only then)."""

        @classmethod
        def affinity(cls) -> int:
            return 2  # what SlurmExecutor.affinity() returns when it finds srun

    ex = ScriptOnlySlurmExecutor(folder=sweepdir.slurm_folder(sweep_dir), max_num_timeout=profile.max_requeues)
    params = {k: v for k, v in _slurm_parameters(profile, cfg, f"ablation-{name}", 1, None).items() if v is not None}
    # As AutoExecutor.update_parameters does: generic names translated (timeout_min -> time, ...), the
    # slurm_ prefix dropped from the others.
    native = ex._convert_parameters({k: v for k, v in params.items() if not k.startswith("slurm_")})
    native.update({k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")})
    ex.update_parameters(**native)
    return ex._make_submission_file_text(ex._submitit_command_str, "<uid>")


def describe_profile(profile: Profile, cfg: RunConfig) -> str:
    """'8 GPUs per job (1 node x 8 tasks)' or '1 process per job standing in for 8 GPUs (CPU)'."""
    nodes, tasks = profile.geometry(cfg)
    procs = nodes * tasks
    where = f"{nodes} node(s) x {tasks} task(s)"
    if profile.gpus_per_node:
        return f"{procs} GPU(s) per job ({where})" + (f", standing in for {cfg.gpus}" if procs != cfg.gpus else "")
    return f"{procs} CPU process(es) per job ({where}), standing in for {cfg.gpus} GPUs"
