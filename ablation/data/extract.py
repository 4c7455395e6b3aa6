"""The units of `ablation data prepare`'s work and the processes that run them. Torch-free.

A unit (a class's inner tar, a run of validation members of a flat tar, a Hugging Face shard, a class folder of a
tree) yields its images; run_units writes each under STATE/partial/<split>/<wnid>/ through a temporary name and a
rename, skips the images already there, and leaves a marker in STATE/done/ when the unit is finished, so that a
prepare killed half-way and started again redoes neither finished units nor written images.
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import sys
import tarfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from ablation import faults, rundir
from ablation.data import imagenet as inet
from ablation.errors import DataError, DiskFullError

TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------
# Units of work: each yields (split, wnid, file name, bytes) for the images it writes.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One unit of work: its kind, the archive or folder it reads, what it reads there, its size for the progress bar."""

    name: str  # unique, a file name: the marker DEST/.prepare/done/<name>.json
    kind: str  # innertar | members | targz | files
    path: str
    size: int
    items: tuple[Any, ...] = ()  # members: (offset, size, split, wnid, name) each; files: (source path, split, wnid, name)
    # each; innertar: (offset, size) of the inner tar in the outer one
    split: str = "train"
    wnid: str = ""
    keep: int | None = None  # innertar: the first `keep` files by name
    wnids: tuple[str, ...] = ()  # targz: the classes kept (empty: all)


class _Window(io.RawIOBase):
    """A read-only, seekable view of `size` bytes at `offset` of a file: an inner tar read in place."""

    def __init__(self, f: BinaryIO, offset: int, size: int):
        self.f, self.offset, self.size, self.pos = f, offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = max(0, min(self.size, {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]))
        return self.pos

    def readinto(self, b: Any) -> int:
        n = min(len(b), self.size - self.pos)
        if n <= 0:
            return 0
        self.f.seek(self.offset + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def damaged_error(path: str, exc: BaseException, member: str | None = None) -> DataError:
    """The one-line error for an archive that cannot be read (cut short or corrupt)."""
    where = f"member {member} of {path}" if member else path
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"cannot read {where}: {reason}; the archive is truncated or corrupt: download it again "
                     f"(or check it against its md5 without --no-verify)")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str) -> bytes:
    """A tar member's bytes, all of them, or the damaged-archive error."""
    f = tar.extractfile(member)
    data = f.read() if f is not None else b""
    if len(data) != member.size:
        raise damaged_error(path, EOFError(f"{len(data)} of {member.size} bytes"), member.name)
    return data


def unit_images(unit: Unit) -> Iterator[tuple[str, str, str, bytes]]:
    """(split, wnid, file name, bytes) of every image a unit writes."""
    try:
        if unit.kind == "files":
            for src, split, wnid, name in unit.items:
                yield split, wnid, name, Path(src).read_bytes()
        elif unit.kind == "members":
            with open(unit.path, "rb") as f:
                for offset, size, split, wnid, name in unit.items:
                    f.seek(offset)
                    data = f.read(size)
                    if len(data) != size:
                        raise damaged_error(unit.path, EOFError(f"{len(data)} of {size} bytes"), name)
                    yield split, wnid, name, data
        elif unit.kind == "innertar":
            offset, size = unit.items
            label = f"{unit.path}:{unit.wnid}.tar"
            with open(unit.path, "rb") as f, tarfile.open(fileobj=io.BufferedReader(_Window(f, offset, size)), mode="r:") as tar:
                members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
                for m in members[: unit.keep]:
                    yield unit.split, unit.wnid, m.name.rsplit("/", 1)[-1], _read_member(tar, m, label)
        else:  # targz: a Hugging Face shard, streamed
            keep = set(unit.wnids)
            with tarfile.open(unit.path, mode="r|*") as tar:
                for m in tar:
                    parsed = inet.hf_member(m.name) if m.isfile() else None
                    if parsed is not None and (not keep or parsed[1] in keep):
                        yield unit.split, parsed[1], parsed[0], _read_member(tar, m, unit.path)
    except (tarfile.TarError, EOFError, zlib.error) as exc:  # zlib.error: a corrupt .tar.gz
        raise damaged_error(unit.path, exc, f"{unit.wnid}.tar" if unit.kind == "innertar" else None) from exc


def classify(data: bytes, where: str) -> str | None:
    """None for a JPEG in RGB or grayscale (what its name says); else what it is ('CMYK JPEG', 'PNG');
    DataError for bytes that are no image (a corrupt member). Reads the header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, mode = img.format, img.mode
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where} is not a readable image ({' '.join(str(exc).split())}); it is damaged: "
                        f"download it again") from exc
    if fmt == "JPEG" and mode in ("RGB", "L"):
        return None
    return f"{mode} {fmt}" if fmt == "JPEG" else str(fmt)


def write_image(partial: Path, rel: str, data: bytes) -> None:
    """Write one image under its temporary name, then rename it: a name in partial/ is always a whole file."""
    path = partial / rel
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            faults.hit("prepare:write")  # tests kill or fill the disk here: the data written, the rename not yet done
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full writing {path}: prepare stopped, no half-written file left and the dataset not "
                                f"marked complete; free space (or pick another --out) and run the same command again: it resumes") from exc
        raise


def run_unit(args: tuple[Unit, str]) -> dict[str, Any]:
    """Write a unit's images under DEST/.prepare/partial, skipping those already there; mark it done. Returns its record."""
    unit, state = args
    partial = Path(state) / "partial"
    written = skipped = 0
    odd: dict[str, str] = {}
    made: set[str] = set()
    for split, wnid, name, data in unit_images(unit):
        rel = f"{split}/{wnid}/{name}"
        kind = classify(data, os.path.join(unit.path, name) if unit.kind == "files" else f"{unit.path}: {name}")
        if kind:
            odd[rel] = kind
        if f"{split}/{wnid}" not in made:
            (partial / split / wnid).mkdir(parents=True, exist_ok=True)
            made.add(f"{split}/{wnid}")
        if (partial / rel).exists():
            skipped += 1
            continue
        write_image(partial, rel, data)
        written += 1
    record = {"unit": unit.name, "written": written, "skipped": skipped, "odd": odd}
    rundir.write_json(Path(state) / "done" / f"{unit.name}.json", record)
    return {**record, "size": unit.size}


def remove_temporaries(partial: Path) -> None:
    """Delete the temporary files a killed prepare left (their images are written again)."""
    for folder, _, files in os.walk(partial):
        for name in files:
            if name.endswith(TMP_SUFFIX):
                os.unlink(os.path.join(folder, name))


def _progress(total: int, show: bool) -> Any:
    """One progress bar over the source bytes read (a terminal only)."""
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: a process with threads may not fork its pool's workers safely
    return tqdm(total=total, unit="B", unit_scale=True, desc="prepare", dynamic_ncols=True, disable=not show)


def run_units(units: list[Unit], state: Path, workers: int, progress: bool) -> list[dict[str, Any]]:
    """Run the units not done yet, in a pool of `workers` processes (in this one for 1); the records of all."""
    done_dir = state / "done"
    records, todo = [], []
    for u in units:
        rec = rundir.read_json(done_dir / f"{u.name}.json")
        if rec is None:
            todo.append(u)
        else:  # done by an earlier, interrupted prepare: all its images count as resumed
            records.append({**rec, "skipped": rec["written"] + rec["skipped"], "written": 0})
    bar = _progress(sum(u.size for u in units), progress)
    bar.update(sum(u.size for u in units if u not in todo))
    jobs = [(u, str(state)) for u in sorted(todo, key=lambda u: -u.size)]  # big units first: the pool ends together
    try:
        if workers > 1 and len(jobs) > 1 and sys.platform.startswith("linux"):
            # fork, not spawn: the children read archives and write files (torch-free), like synth's pool. An executor,
            # not a Pool: a worker killed (OOM killer) breaks it with an error instead of hanging on its lost unit.
            pool = ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("fork"))
            try:
                for fut in as_completed([pool.submit(run_unit, job) for job in jobs]):
                    rec = fut.result()
                    records.append(rec)
                    bar.update(rec["size"])
            except BrokenProcessPool as exc:
                raise DataError(f"an extraction process died (killed, or out of memory) while preparing {state.parent}; "
                                f"run the same command again: it resumes where it stopped") from exc
            finally:  # a failed unit stops the others' queue: the error is reported now, not after every other unit ran
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for job in jobs:
                rec = run_unit(job)
                records.append(rec)
                bar.update(rec["size"])
    finally:
        bar.close()
    return records
