"""Tar shards of an ImageFolder tree: a few large files instead of 1.3 M small ones, read in place by offset.

Each split becomes <split>-000000.tar, <split>-000001.tar, ... of about `shard_bytes` each; members are named
<class>/<file> (the label is the name's first part) and follow the tree's sample order (sorted classes, then
torchvision's walk order), with fixed times and owners: the same tree writes the same bytes. The shards are then
indexed (archives.write_index), so `data.root=DEST` trains on exactly the tree's images, in the tree's order.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Callable
from pathlib import Path

from ablation import rundir
from ablation.data import archives
from ablation.data.layout import DATASET_JSON, SPLITS, scan_layout
from ablation.errors import DataError

SHARD_BYTES = 1 << 30  # 1 GiB: ~140 shards for ImageNet's train set, large enough for a parallel file system's stripes


def _info(name: str, size: int) -> tarfile.TarInfo:
    """A member header that depends on the name and size only (no owner, time or mode from the file system)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    return info


def _groups(files: list[tuple[str, str, int]], shard_bytes: int) -> list[list[tuple[str, str, int]]]:
    """Consecutive runs of (member name, path, size) of about shard_bytes each (one file at least)."""
    groups: list[list[tuple[str, str, int]]] = [[]]
    used = 0
    for row in files:
        if groups[-1] and used + row[2] > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += row[2] + 1024  # header and padding
    return groups


def write_shards(tree: str | Path, dest: str | Path, shard_bytes: int = SHARD_BYTES,
                 progress: Callable[[str], None] | None = None, record: bool = True) -> list[Path]:
    """Write the tar shards of an ImageFolder tree into dest, then its index; return the shard paths.

    record: copy the tree's dataset.json (a prepared tree's record) beside them; prepare --format tar writes its own.
    """
    if shard_bytes < 1:
        raise DataError(f"shard size must be positive, got {shard_bytes} bytes")
    tree, dest = Path(tree).expanduser(), Path(dest).expanduser()
    if archives.archive_kind(tree):
        raise DataError(f"{tree} is a folder of archives already; shard an extracted ImageFolder tree (train/<class>/, val/<class>/)")
    if dest.resolve() == tree.resolve() or dest.resolve().is_relative_to(tree.resolve()):
        raise DataError(f"--out {dest} is inside the tree {tree}; write the shards to another folder")
    scan = scan_layout(tree)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for split in SPLITS:
        files = [(f"{cls}/{name}", os.path.join(tree, split, cls, name), 0)
                 for cls, names in zip(scan.info.classes, scan.files[split]) for name in names]
        files = [(member, path, os.path.getsize(path)) for member, path, _ in files]
        groups = _groups(files, shard_bytes)
        for k, group in enumerate(groups):
            path = dest / f"{split}-{k:06d}.tar"
            with rundir.atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for member, src, size in group:
                    with open(src, "rb") as f:
                        tar.addfile(_info(member, size), f)
            written.append(path)
            if progress:
                progress(f"{path.name}: {len(group)} images")
        for stale in archives.shard_names(dest, split)[len(groups):]:  # an earlier, finer sharding's tail
            (dest / stale).unlink()
    if record and (tree / DATASET_JSON).is_file():  # a prepared tree's record (its subset, above all) describes the shards too
        rundir.write_bytes(dest / DATASET_JSON, (tree / DATASET_JSON).read_bytes())
    archives.write_index(dest)
    return written
