"""What every benchmark script shares: the record of the machine the figures come from, and the JSON-lines
append to benchmarks/results/<name>.jsonl (or to the folder in ABLATION_BENCH_OUT, or to a script's --out).

Scripts run as `python benchmarks/<name>.py`, so this folder is on sys.path and `import common` finds this file.
This module never imports torch itself: a script that does not (report_speed.py) records no torch fields.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OUT_ENV = "ABLATION_BENCH_OUT"  # a folder that receives the records instead of benchmarks/results (tests, tiny runs)


def results_file(name: str) -> Path:
    """Where a script's records go by default: <ABLATION_BENCH_OUT or benchmarks/results>/<name>.jsonl."""
    return Path(os.environ.get(OUT_ENV) or RESULTS) / f"{name}.jsonl"


def stamp() -> str:
    """The local time a record is stamped with."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def machine(device: str | None = None, **versions: object) -> dict:
    """The machine the figures come from: host, platform, CPU, usable cores, Python; with a device (a torch
    script) also torch's threads, the device's name and torch's version; then any other versions given."""
    m: dict[str, object] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
    }
    if device is not None:
        import torch

        m["threads"] = torch.get_num_threads()
        m["device"] = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
        m["torch"] = torch.__version__
    return {**m, **versions}


def append(path: Path, records: list[dict]) -> Path:
    """Append one JSON line per record to path (its folder made when missing); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path
