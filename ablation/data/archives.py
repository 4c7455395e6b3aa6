"""Reading ImageNet in place from its archives: an index of member offsets, built once, checked at every load.

Two kinds of archive folder are read without extraction:
- the official ILSVRC2012 downloads: ILSVRC2012_img_train.tar (a tar of per-class tars), ILSVRC2012_img_val.tar
  (flat files) and ILSVRC2012_devkit_t12.tar.gz (the validation labels);
- tar shards as `ablation data shard` / `prepare --format tar` write them: train-NNNNNN.tar and val-NNNNNN.tar,
  members named <wnid>/<file>.
The index maps split -> class -> (file name relative to the class folder, archive, offset, size): the names an
extracted ImageFolder tree would hold, so layout.py orders classes and samples exactly as for the tree. It records
each archive's size and mtime: a changed archive is detected at load and the user is told to re-index.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation import rundir
from ablation.data import imagenet
from ablation.data.members import Member
from ablation.errors import DataError
from ablation.gcpause import gc_paused

TRAIN_TAR, VAL_TAR, DEVKIT = imagenet.TRAIN_TAR, imagenet.VAL_TAR, imagenet.DEVKIT
OFFICIAL_FILES = (TRAIN_TAR, VAL_TAR, DEVKIT)
SHARD = re.compile(r"^(train|val)-(\d{6})\.tar$")
INDEX_NAME = "ablation-index.json.gz"
FORMAT = 1
OFFICIAL, SHARDS = "ilsvrc2012-archives", "tar-shards"  # DatasetInfo.layout of the two kinds


@dataclass(frozen=True)
class ArchiveIndex:
    """Where every image of an archive folder lies: split -> wnid -> [(relative name, Member)], archive order."""

    root: str
    kind: str  # OFFICIAL or SHARDS
    path: str  # the index file it was read from (or written to)
    splits: dict[str, dict[str, list[tuple[str, Member]]]]


def archive_kind(root: str | Path) -> str | None:
    """OFFICIAL or SHARDS when root is a folder of archives the harness reads in place, else None (cheap: a listing).

    A folder that also holds train/ and val/ folders is an ImageFolder tree (extracted beside its archives): read as one.
    """
    root = Path(root).expanduser()
    if (root / "train").is_dir() and (root / "val").is_dir():
        return None
    if (root / TRAIN_TAR).is_file() or (root / VAL_TAR).is_file():
        return OFFICIAL
    try:
        names = os.listdir(root)
    except OSError:
        return None
    return SHARDS if any(SHARD.match(n) for n in names) else None


def check_archives(root: str | Path) -> None:
    """Cheap check that an archive folder has what both splits need (before a sweep submits)."""
    root = Path(root).expanduser()
    if archive_kind(root) == SHARDS:
        for split in ("train", "val"):
            if not shard_names(root, split):
                raise DataError(f"tar-shard folder {root} has no {split}-NNNNNN.tar shard; write both splits with "
                                f"`ablation data shard TREE --out {root}`")
        return
    missing = [n for n in OFFICIAL_FILES if not (root / n).is_file()]
    if missing:
        raise DataError(f"archive folder {root} lacks {', '.join(missing)}; put the three ILSVRC2012 downloads "
                        f"({', '.join(OFFICIAL_FILES)}) in it")


def shard_names(root: Path, split: str) -> list[str]:
    """A split's shard file names, in order."""
    return sorted(n for n in os.listdir(root) if (m := SHARD.match(n)) and m.group(1) == split)


# ---------------------------------------------------------------------------------------------
# Where the index lives.
# ---------------------------------------------------------------------------------------------


def default_cache() -> Path:
    """$ABLATION_INDEX_CACHE, else $XDG_CACHE_HOME/ablation/index (~/.cache/ablation/index)."""
    if os.environ.get("ABLATION_INDEX_CACHE"):
        return Path(os.environ["ABLATION_INDEX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ablation" / "index"


def index_path(root: str | Path, cache: str | Path | None) -> Path:
    """The index file of root: beside its archives (cache None), or in cache under a name keyed by root's path."""
    root = Path(root).expanduser().resolve()
    if cache is None:
        return root / INDEX_NAME
    key = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return Path(cache).expanduser() / f"{root.name}-{key}.json.gz"


def identity(path: Path) -> dict[str, Any]:
    """What tells a changed archive: its size and modification time."""
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------------------------------------
# Building.
# ---------------------------------------------------------------------------------------------


def _tar_error(path: Path, exc: BaseException) -> DataError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return DataError(f"cannot read archive {path}: {reason}; it is truncated or damaged: download it again (or write it again)")


def _check_extent(path: Path, size: int, member: str, end: int) -> None:
    """A member whose data runs past the end of the archive: the archive was cut short."""
    if end > size:
        raise DataError(f"archive {path} ends inside member {member} (needs {end} bytes, has {size}): it is truncated; "
                        "download it again (or write it again)")


def _index_flat(path: Path, base: int, fileobj: Any = None) -> list[tuple[str, int, int]]:
    """(name, offset, size) of every regular file of a tar (inside an outer one at `base` when fileobj is given)."""
    out = []
    size = path.stat().st_size
    try:
        with tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj) as tar:
            for m in tar:
                if m.isfile():
                    _check_extent(path, size, m.name, base + m.offset_data + m.size)
                    out.append((m.name, base + m.offset_data, m.size))
    except (tarfile.TarError, EOFError) as exc:
        raise _tar_error(path, exc) from exc
    return out


def _index_train_tar(path: Path) -> dict[str, list[tuple[str, int, int, str]]]:
    """ILSVRC2012_img_train.tar: wnid -> [(file name, offset in the outer file, size, member name)]."""
    size = path.stat().st_size
    classes: dict[str, list[tuple[str, int, int, str]]] = {}
    try:
        with tarfile.open(path, mode="r:") as outer:
            for inner in outer:
                if not inner.isfile():
                    continue
                if not inner.name.endswith(".tar"):
                    raise DataError(f"{path} holds {inner.name}, not a per-class <wnid>.tar: it is not ILSVRC2012's "
                                    "training archive; put the official download there")
                _check_extent(path, size, inner.name, inner.offset_data + inner.size)
                wnid = Path(inner.name).name[: -len(".tar")]
                f = outer.extractfile(inner)
                rows = _index_flat(path, inner.offset_data, fileobj=f)
                classes.setdefault(wnid, []).extend((n, off, sz, f"{inner.name}/{n}") for n, off, sz in rows)
    except (tarfile.TarError, EOFError) as exc:
        raise _tar_error(path, exc) from exc
    return classes


def _few(names: list[str], limit: int = 3) -> str:
    """First few names, and how many more."""
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _index_val_tar(path: Path, devkit: Path, kit: imagenet.Devkit) -> dict[str, list[tuple[str, int, int, str]]]:
    """ILSVRC2012_img_val.tar, labelled by the devkit (by wnid): wnid -> [(file name, offset, size, member name)]."""
    rows = _index_flat(path, 0)
    labels = kit.val_labels
    missing = sorted(set(labels) - {Path(n).name for n, _, _ in rows})
    if missing:
        raise DataError(f"{path} lacks {len(missing)} of the {len(labels)} validation files {devkit.name} labels ({_few(missing)}); "
                        "it is incomplete: download it again")
    classes: dict[str, list[tuple[str, int, int, str]]] = {}
    for name, off, sz in rows:
        base = Path(name).name
        if base not in labels:
            raise DataError(f"{devkit} has no label for {path.name}:{name}; use the devkit of the same year (ILSVRC2012)")
        classes.setdefault(labels[base], []).append((base, off, sz, name))
    return classes


def _index_shards(root: Path, split: str) -> tuple[list[Path], dict[str, list[tuple[str, int, int, str, int]]]]:
    """A split's shards: (their paths, wnid -> [(name relative to the class, offset, size, member name, shard)])."""
    paths = [root / n for n in shard_names(root, split)]
    classes: dict[str, list[tuple[str, int, int, str, int]]] = {}
    for k, path in enumerate(paths):
        for name, off, sz in _index_flat(path, 0):
            wnid, sep, rel = name.partition("/")
            if not sep or not rel:
                raise DataError(f"shard {path} holds {name}, not <class>/<file>; write the shards with "
                                f"`ablation data shard TREE --out {root}`")
            classes.setdefault(wnid, []).append((rel, off, sz, name, k))
    return paths, classes


def build_index(root: str | Path) -> dict[str, Any]:
    """The index document of an archive folder (JSON-ready): its kind, archives' identities and every member."""
    root = Path(root).expanduser().resolve()
    kind = archive_kind(root)
    if kind is None:
        raise DataError(f"{root} holds neither the ILSVRC2012 archives ({TRAIN_TAR}, {VAL_TAR}, {DEVKIT}) nor tar shards "
                        "(train-000000.tar, val-000000.tar); point it at one of them")
    check_archives(root)
    archives: list[dict[str, Any]] = []
    splits: dict[str, dict[str, list[list[Any]]]] = {}
    if kind == OFFICIAL:
        for name in OFFICIAL_FILES:
            archives.append(identity(root / name))
        kit = imagenet.read_devkit(root / DEVKIT)
        train = _index_train_tar(root / TRAIN_TAR)
        missing = sorted({s.wnid for s in kit.classes} - set(train))
        if missing:
            raise DataError(f"{root / TRAIN_TAR} lacks the per-class tar of {len(missing)} of the devkit's {len(kit.classes)} classes "
                            f"({_few([w + '.tar' for w in missing])}); it is incomplete: download it again")
        val = _index_val_tar(root / VAL_TAR, root / DEVKIT, kit)
        splits = {"train": {w: [[n, 0, o, s, m] for n, o, s, m in rows] for w, rows in train.items()},
                  "val": {w: [[n, 1, o, s, m] for n, o, s, m in rows] for w, rows in val.items()}}
    else:
        for split in ("train", "val"):
            paths, classes = _index_shards(root, split)
            first = len(archives)
            archives.extend(identity(p) for p in paths)
            splits[split] = {w: [[n, first + k, o, s, m] for n, o, s, m, k in rows] for w, rows in classes.items()}
    return {"format": FORMAT, "kind": kind, "archives": archives, "splits": splits}


def write_index(root: str | Path, cache: str | Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Build root's index and write it atomically beside the archives (cache None) or into cache; (its path, the document)."""
    doc = build_index(root)
    path = index_path(root, cache)
    try:
        rundir.write_bytes(path, gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0))
    except PermissionError as exc:
        raise DataError(f"cannot write the index {path}: {exc.strerror}; pass --cache DIR (a folder you can write; "
                        f"set ABLATION_INDEX_CACHE=DIR so that runs find it)") from exc
    return path, doc


# ---------------------------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------------------------




def find_index(root: str | Path) -> Path | None:
    """The index of root: beside its archives, else in the default cache (default_cache()); None when neither has one."""
    for cache in (None, default_cache()):
        path = index_path(root, cache)
        if path.is_file():
            return path
    return None


def _read_doc(path: Path, root: Path) -> dict[str, Any]:
    redo = f"run `ablation data index {root}` again"
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"index {path} is unreadable ({' '.join(str(exc).split())}); {redo}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"index {path} is of another format than this version's ({FORMAT}); {redo}")
    return doc


def load_index(root: str | Path, path: str | Path | None = None) -> ArchiveIndex:
    """Read root's index (find_index's, or `path`) and check every archive is still the one indexed."""
    root = Path(root).expanduser().resolve()
    path = Path(path) if path is not None else find_index(root)
    if path is None:
        raise DataError(f"archive folder {root} has no index; run `ablation data index {root}` once "
                        f"(add --cache DIR where {root} is read-only)")
    with gc_paused():
        return _load(root, path, _read_doc(path, root))


def _load(root: Path, path: Path, doc: dict[str, Any]) -> ArchiveIndex:
    """The ArchiveIndex of a parsed index document, its archives checked against the files."""
    members: list[str] = []
    for a in doc["archives"]:
        p = root / a["name"]
        try:
            now = identity(p)
        except FileNotFoundError:
            raise DataError(f"archive {p}, which index {path} lists, is missing; restore it, or run "
                            f"`ablation data index {root}` again") from None
        if (now["size"], now["mtime_ns"]) != (a["size"], a["mtime_ns"]):
            what = f"size {a['size']} -> {now['size']} bytes" if now["size"] != a["size"] else "modification time"
            raise DataError(f"archive {p} changed since index {path} was built ({what}); run `ablation data index {root}` again")
        members.append(str(p))
    new = tuple.__new__  # Member(...) through its generated Python __new__ costs twice as much, 1.3 M times
    splits = {split: {wnid: [(n, new(Member, (members[a], o, s, m))) for n, a, o, s, m in rows] for wnid, rows in classes.items()}
              for split, classes in doc["splits"].items()}
    return ArchiveIndex(str(root), doc["kind"], str(path), splits)


def ensure_index(root: str | Path, log: Callable[[str], None] | None = None) -> ArchiveIndex:
    """load_index, building the index first where none exists (beside the archives, else in the default cache)."""
    if find_index(root) is None:
        root = Path(root).expanduser()
        cache = None if os.access(root, os.W_OK) else default_cache()
        if log:
            log(f"indexing the archives of {root} once (a pass over their tar headers: minutes for ImageNet-1k)")
        path, _ = write_index(root, cache)
        if log:
            log(f"indexed the archives of {root}: {path}")
    return load_index(root)
