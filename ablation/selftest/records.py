"""Where self-test records live and whether a passing one exists for a GPU type. Torch-free: `ablation sweep` reads it.

A self-test writes <out>/selftest.json; by default <out> is <results>/selftest/<UTC time>-<host>, so the records
of every node a user tested sit side by side under the results root a sweep submits from, and a sweep on a GPU
profile looks there for one that passed on its GPU type (the profile's `gpu`, matched within the GPU's name).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

SELFTEST_JSON = "selftest.json"
FOLDER = "selftest"  # under the results root


def default_out(results: str | Path, where: str | None = None) -> Path:
    """<results>/selftest/<UTC time>-<where, else this host>: one folder per self-test, never overwritten."""
    return Path(results) / FOLDER / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{where or socket.gethostname()}"


def find(results: str | Path) -> list[dict[str, Any]]:
    """Every readable selftest.json under <results>/selftest/ (a damaged one is left out: it proves nothing)."""
    out = []
    for path in sorted((Path(results) / FOLDER).glob(f"*/{SELFTEST_JSON}")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def passed_on(records: list[dict[str, Any]], gpu: str | None) -> bool:
    """True when a record passed on a GPU of this type (any GPU where the profile names none)."""
    for r in records:
        name = str((r.get("versions") or {}).get("gpu") or "")
        if r.get("passed") is True and r.get("device") == "cuda" and name and (gpu is None or gpu.lower() in name.lower()):
            return True
    return False


def sweep_warning(gpus_per_node: int, gpu: str | None, profile: str, results: str | Path) -> str | None:
    """profile: its file. The one line `ablation sweep` prints on a GPU profile without a passing self-test of its GPU type, else None."""
    if not gpus_per_node or passed_on(find(results), gpu):
        return None
    kind = f"GPU type {gpu}" if gpu else "any GPU (the profile names no gpu:)"
    return (f"warning: no passing self-test for {kind} under {Path(results) / FOLDER}: run `ablation selftest --profile {profile} "
            "--submit` first (minutes that check every CUDA path before the sweep spends GPU-hours; docs/selftest.md)")
