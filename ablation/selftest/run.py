"""`ablation selftest`: run every check, print the table, write selftest.json (atomically), record the throughput rows."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ablation import provenance, rundir
from ablation.errors import ConfigError, one_line
from ablation.selftest import checks, cuda, multi, records, speed
from ablation.selftest.checks import Check, Settings

SCHEMA = 1
# The paper's images per GPU (Figure 1): the throughput and loader checks measure each.
PAPER_BATCHES = (32, 16, 8, 4, 2)


def settings(device: str, gpus: int | None, batches: tuple[int, ...], cpus_per_task: int, data: str | None,
             compile_backend: str | None) -> Settings:
    """The settings of a self-test on this device: ResNet-50 at 224 px on a GPU, the tiny ResNet at 32 px on a CPU."""
    if device == "cuda" and not cuda.available():
        raise ConfigError("--device cuda: no CUDA device is visible here; run on a GPU node (--profile P --submit) or pass --device cpu")
    if device == "cuda":
        visible = cuda.device_count()
        if gpus is not None and gpus > visible:
            raise ConfigError(f"--gpus {gpus}: only {visible} GPU(s) are visible here")
        return Settings("cuda", gpus or visible, ("device=cuda", "data.workers=0"), batches, steps=20, warmup=5,
                        compile_backend=compile_backend or "inductor", cpus_per_task=cpus_per_task, data=data)
    # inductor on a CPU compiles C++ for minutes on two cores; aot_eager traces the same graphs through AOTAutograd
    return Settings("cpu", 2 if gpus is None else gpus, ("device=cpu", *checks.TINY), batches, steps=2, warmup=1,
                    compile_backend=compile_backend or "aot_eager", cpus_per_task=cpus_per_task, data=data, tiny=True)


def _timed(fn: Callable[[], Any], name: str, what: str) -> list[Check]:
    """Run a check (or several): an exception is that check failing, with its one line."""
    start = time.perf_counter()
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 -- a check that raises has failed; the others still run
        got = Check(name, what, "fail", detail=f"raised {type(e).__name__}: {one_line(e)}")
    out = got if isinstance(got, list) else [got]
    for c in out:
        c.seconds = (time.perf_counter() - start) / len(out)
    return out


def table_line(c: Check) -> str:
    """One row of the printed table."""
    fig = "-" if c.figure is None else f"{c.figure:.3g}"
    sign = ">=" if c.name == "loaders" else (">" if c.name == "throughput" else "<=")
    tol = "-" if c.bound is None else f"{sign} {c.bound:g}"
    return f"{c.name:<16s} {c.status:<8s} {fig:>10s} {tol:>10s}  {c.seconds:5.1f}s  {c.unit}: {c.detail}"


def run(s: Settings, out: Path, gpu_records: Path | None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every check in order, echo the table, write out/selftest.json and append the throughput rows to gpu_records."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    echo(f"ablation selftest on {s.device} ({cuda.versions(s.device)['gpu'] or provenance.cpu_model()}), "
         f"{'tiny model, 32 px' if s.tiny else 'ResNet-50, 224 px'}; {s.gpus} process(es) for the multi-GPU checks")
    echo(f"{'check':<16s} {'status':<8s} {'figure':>10s} {'tolerance':>10s}  {'time':>6s}  unit: detail")
    done: list[Check] = []

    def add(found: list[Check]) -> None:
        for c in found:
            done.append(c)
            echo(table_line(c))

    rows: list[dict[str, Any]] = []
    ips: dict[int, float] = {}

    def speed_check() -> Check:
        check, got, by_batch = speed.throughput(s)
        rows.extend(got)
        ips.update(by_batch)
        return check

    threads = torch.get_num_threads()
    if not s.device.startswith("cuda"):
        torch.set_num_threads(1)  # tiny tensors: more threads only spin-wait, and collapse on a shared machine
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _all_checks(s, Path(tmp), add, speed_check, ips)
    finally:
        torch.set_num_threads(threads)
    recorded = None
    if gpu_records is not None and rows:
        Path(gpu_records).parent.mkdir(parents=True, exist_ok=True)
        rundir.append_jsonl(gpu_records, rows)  # whole lines only: the estimates skip a torn tail
        recorded = str(gpu_records)
    doc = {
        "schema": SCHEMA,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "device": s.device,
        "passed": not any(c.status == "fail" for c in done),
        "counts": {k: sum(c.status == k for c in done) for k in ("pass", "fail", "warn", "skipped")},
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"host": platform.node(), "platform": platform.platform(), "cpu": provenance.cpu_model(),
                    "python": platform.python_version(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
        "versions": {**cuda.versions(s.device), "torch": torch.__version__, "packages": provenance.package_versions(),
                     "ablation_code": provenance.code_version()},
        "settings": {"device": s.device, "gpus": s.gpus, "overrides": list(s.overrides), "batches": list(s.batches), "steps": s.steps,
                     "warmup": s.warmup, "compile_backend": s.compile_backend, "cpus_per_task": s.cpus_per_task, "data": s.data,
                     "tiny": s.tiny},
        "checks": [c.as_json() for c in done],
        "throughput_rows": rows,
        "throughput_recorded_in": recorded,
    }
    rundir.write_json(out / records.SELFTEST_JSON, json.loads(json.dumps(doc, default=float)))
    verdict = "PASSED" if doc["passed"] else "FAILED"
    echo(f"{verdict}: {doc['counts']['pass']} pass, {doc['counts']['fail']} fail, {doc['counts']['warn']} warn, "
         f"{doc['counts']['skipped']} skipped in {doc['seconds']:.0f} s; wrote {out / records.SELFTEST_JSON}"
         + (f"; throughput rows appended to {recorded}" if recorded else ""))
    return doc


def _all_checks(s: Settings, tmp: Path, add: Callable[[list[Check]], None], speed_check: Callable[[], Check],
                ips: dict[int, float]) -> None:
    """Every check in its order, each added to the table as it ends."""
    root = Path(s.data) if s.data else checks.sample_jpegs(tmp / "jpegs", s.tiny)
    # the processes first: on a CPU they are forked before this process has started any thread pool
    add(_timed(lambda: multi.run(s), "ddp_vs_stand_in", "real DDP processes vs the stand-in"))
    add(_timed(lambda: checks.bn_stand_in(s), "bn_stand_in", "per-GPU BN stand-in vs the per-chunk loop"))
    add(_timed(lambda: checks.channels_last(s), "channels_last", "channels-last vs NCHW"))
    add(_timed(lambda: checks.bf16(s), "bf16", "bf16 autocast vs fp32"))
    add(_timed(lambda: checks.compiled(s), "compile", "compile vs eager"))
    add(_timed(lambda: checks.decode(s, root), "decode", "device-decode pixels vs PIL's"))
    add(_timed(speed_check, "throughput", "training images/s per GPU"))
    if ips and all(math.isfinite(v) and v > 0 for v in ips.values()):
        add(_timed(lambda: speed.loaders(s, root, ips), "loaders", "can the loaders feed the GPU"))
    else:
        add([Check("loaders", "can the loaders feed the GPU", "skipped", detail="skipped: no throughput figure to feed")])
