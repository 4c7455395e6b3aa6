"""Reading ImageNet in place, at ImageNet's scale: building the member index once, and loading it at every run's start.

Build: writes tar shards of --build-classes x --build-per-class members (1-byte payloads: indexing reads headers,
never the images) and times `archives.write_index` over them (members/s). Load: writes an index document of
--classes x --per-class train and --val-per-class val members (default ImageNet-1k's shape: 1,000 x 1,281 + 50 =
1,331,000) over two small shard files, then times what a run's start does with it: `archives.load_index` (read,
decompress, parse, check each archive's size and mtime) and `layout.scan_archives` (classes, order, fingerprint),
with the index file's size and the memory the index and scan hold. Prints the figures and appends one JSON
record to benchmarks/results/index_scale.jsonl. Run:

    python benchmarks/index_scale.py [--classes 1000 --per-class 1281 --val-per-class 50] [--build-classes 100]
    python benchmarks/index_scale.py --tiny --out FILE   # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import append, machine, results_file, stamp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablation.data import archives  # noqa: E402
from ablation.data.layout import scan_archives  # noqa: E402


def wnid(c: int) -> str:
    return f"n{10000000 + c:08d}"


def write_shard(path: Path, names: list[str]) -> None:
    """A tar of 1-byte members with these names."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"\xff"))


def build_case(work: Path, classes: int, per_class: int) -> dict:
    """Seconds to index tar shards of classes x per_class train members (and one val member per class)."""
    write_shard(work / "train-000000.tar", [f"{wnid(c)}/{wnid(c)}_{j}.JPEG" for c in range(classes) for j in range(per_class)])
    write_shard(work / "val-000000.tar", [f"{wnid(c)}/ILSVRC2012_val_{c + 1:08d}.JPEG" for c in range(classes)])
    start = time.perf_counter()
    path, doc = archives.write_index(work)
    seconds = time.perf_counter() - start
    members = sum(len(rows) for split in doc["splits"].values() for rows in split.values())
    return {"build_members": members, "build_seconds": seconds, "build_members_per_s": members / seconds}


def load_case(work: Path, classes: int, per_class: int, val_per_class: int) -> dict:
    """Seconds and memory for a run's start over an index of ImageNet's shape (offsets made up: nothing is read)."""
    for name in ("train-000000.tar", "val-000000.tar"):
        write_shard(work / name, ["x/y.JPEG"])
    ids = [archives.identity(work / n) for n in ("train-000000.tar", "val-000000.tar")]
    splits = {
        "train": {wnid(c): [[f"{wnid(c)}_{j}.JPEG", 0, 1024 * (c * per_class + j), 110_000, f"{wnid(c)}/{wnid(c)}_{j}.JPEG"]
                            for j in range(per_class)] for c in range(classes)},
        "val": {wnid(c): [[f"ILSVRC2012_val_{c * val_per_class + j + 1:08d}.JPEG", 1, 1024 * j, 110_000,
                           f"{wnid(c)}/ILSVRC2012_val_{c * val_per_class + j + 1:08d}.JPEG"] for j in range(val_per_class)]
                for c in range(classes)},
    }
    doc = {"format": archives.FORMAT, "kind": archives.SHARDS, "archives": ids, "splits": splits}
    path = archives.index_path(work, None)
    path.write_bytes(gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0))
    del doc, splits
    rss = resident()
    start = time.perf_counter()
    index = archives.load_index(work)
    loaded = time.perf_counter() - start
    scan = scan_archives(index)
    scanned = time.perf_counter() - start - loaded
    held = resident() - rss  # the index and the scan, both alive: what a run's main process keeps
    return {"members": scan.info.train_images + scan.info.val_images, "index_bytes": path.stat().st_size,
            "load_seconds": loaded, "scan_seconds": scanned, "start_seconds": loaded + scanned, "held_mb": held / 2**20}


def resident() -> int:
    """This process's resident memory in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=1000, help="classes of the loaded index (default 1000)")
    ap.add_argument("--per-class", type=int, default=1281, help="train members per class of the loaded index (default 1281)")
    ap.add_argument("--val-per-class", type=int, default=50, help="val members per class of the loaded index (default 50)")
    ap.add_argument("--build-classes", type=int, default=100, help="classes of the shards indexed (default 100)")
    ap.add_argument("--build-per-class", type=int, default=1300, help="train members per class of the shards indexed (default 1300)")
    ap.add_argument("--tiny", action="store_true", help="a few classes and members: a smoke test")
    ap.add_argument("--out", type=Path, default=None, help="JSON-lines file to append to (default benchmarks/results/index_scale.jsonl)")
    args = ap.parse_args()
    if args.tiny:
        args.classes, args.per_class, args.val_per_class, args.build_classes, args.build_per_class = 10, 5, 2, 4, 10
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "build").mkdir()
        (Path(tmp) / "load").mkdir()
        record = {"benchmark": "index_scale", "time": stamp(), "tiny": args.tiny, "machine": machine(),
                  **build_case(Path(tmp) / "build", args.build_classes, args.build_per_class),
                  **load_case(Path(tmp) / "load", args.classes, args.per_class, args.val_per_class)}
    print(f"index build: {record['build_members']:,} members in {record['build_seconds']:.2f} s "
          f"({record['build_members_per_s']:,.0f} members/s)")
    print(f"run start over {record['members']:,} members: index {record['index_bytes'] / 2**20:.1f} MiB, load "
          f"{record['load_seconds']:.2f} s + scan {record['scan_seconds']:.2f} s, {record['held_mb']:.0f} MB held")
    print(f"appended to {append(args.out or results_file('index_scale'), [record])}")


if __name__ == "__main__":
    main()
