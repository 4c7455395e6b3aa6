"""`ablation data prepare imagenet SRC --out DEST`: an ImageNet source (imagenet.detect_source) -> the ImageFolder tree.

Uses no torch (the layout module it shares with the trainer imports torchvision, for ImageFolder's image extensions:
the pool's children are forked before anything of torch runs). Here: the checks up front (md5s, free space, what DEST
holds), the plan of each source (its classes, validation labels and units of work), and the end (counts, class folders
moved into place, dataset.json). The units run in extract.py, in a process pool sized by the CPU budget
(cpus.usable_cores), each image written under DEST/.prepare/partial/ through a temporary name and a rename, a marker
per finished unit: a prepare killed half-way and started again skips the finished units and the images already
written. Class folders move into DEST/<split>/ once every unit is done, and DEST/dataset.json is written last: a DEST
without dataset.json is not a prepared dataset.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ablation import rundir
from ablation.cpus import usable_cores
from ablation.data import imagenet as inet
from ablation.data.extract import Unit, damaged_error, remove_temporaries, run_units
from ablation.data.layout import DATASET_JSON, IMG_EXTENSIONS, SPLITS, scan_layout
from ablation.errors import DataError, DiskFullError

STATE = ".prepare"  # DEST/.prepare/: plan.json, done/<unit>.json, partial/<split>/<wnid>/<file>
FORMAT_VERSION = 1
FORMATS = ("tree", "tar")  # what `--format` writes: an ImageFolder tree, or indexed tar shards of it (ablation.data.shards)
STAGING = ".tree"  # DEST/.tree/: the tree --format tar prepares first, then shards and removes
_VAL_CHUNK = 500  # validation members per unit of the official val tar: units small enough to spread over the pool
SPACE_MARGIN = 1.05  # file-system blocks and folders on top of the images' bytes


@dataclass(frozen=True)
class Expected:
    """The counts (and archive md5s) a verified prepare checks: ImageNet-1k's unless a test gives others."""

    classes: int = inet.CLASSES
    train_images: int = inet.TRAIN_IMAGES
    val_images: int = inet.VAL_IMAGES
    val_per_class: int = inet.VAL_PER_CLASS
    md5: dict[str, str] = field(default_factory=lambda: dict(inet.MD5))


@dataclass(frozen=True)
class Subset:
    """A deterministic subset: N classes evenly spaced over the sorted wnids, the first M train (K val) files by name."""

    classes: int | None = None
    per_class: int | None = None
    val_per_class: int | None = None

    def active(self) -> bool:
        """True when anything is left out."""
        return any(v is not None for v in (self.classes, self.per_class, self.val_per_class))


@dataclass(frozen=True)
class Options:
    """How prepare runs: verify counts and md5s, the subset, the worker processes (0: the CPU budget), a progress bar."""

    verify: bool = True
    subset: Subset = Subset()
    workers: int = 0
    progress: bool = False
    fmt: str = "tree"
    expected: Expected = Expected()


# ---------------------------------------------------------------------------------------------
# Planning: the source's classes, validation labels and units.
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What prepare will write: the classes (sorted wnids), their words where known, the units."""

    wnids: list[str]
    words: dict[str, str]
    units: list[Unit]
    trim: bool = False  # targz units write whole classes: keep the first per_class files by name afterwards
    written_share: float = 1.0  # the share of the units' bytes that is written (a Hugging Face shard's chosen classes)


def _pick_classes(wnids: list[str], subset: Subset) -> list[str]:
    """N classes evenly spaced over the sorted wnids (all of them without --classes)."""
    wnids = sorted(wnids)
    n = subset.classes
    if n is None:
        return wnids
    if not 1 <= n <= len(wnids):
        raise DataError(f"--classes {n}: the source has {len(wnids)} classes; give 1 to {len(wnids)}")
    return [wnids[i * len(wnids) // n] for i in range(n)]


def _tar_index(path: Path) -> list[tarfile.TarInfo]:
    """The members of an uncompressed tar (headers only: the reader seeks over the data)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise damaged_error(str(path), exc) from exc


def _val_units(val_labels: dict[str, str], chosen: set[str] | None, k: int | None, members: list[tuple[int, int, str]],
               path: str, where: str) -> list[Unit]:
    """Units of validation images (offset, size, name) in chunks; every file needs a label. chosen: a subset's classes
    (None: every class, so that a class the train split lacks still shows up, and is reported, in val)."""
    missing = [name for _, _, name in members if name not in val_labels]
    if missing:
        raise DataError(f"validation image {missing[0]} in {path} has no label in {where}"
                        f"{f' (+{len(missing) - 1} more)' if len(missing) > 1 else ''}; use the label file that came with "
                        f"these images (a newer or older download's do not match)")
    per: dict[str, int] = {}
    rows = []
    for offset, size, name in sorted(members, key=lambda r: r[2]):
        wnid = val_labels[name]
        if (chosen is None or wnid in chosen) and (k is None or per.get(wnid, 0) < k):
            per[wnid] = per.get(wnid, 0) + 1
            rows.append((offset, size, "val", wnid, name))
    chunks = [tuple(rows[i:i + _VAL_CHUNK]) for i in range(0, len(rows), _VAL_CHUNK)]
    return [Unit(f"val-{i:05d}", "members", path, sum(r[1] for r in c), c, split="val") for i, c in enumerate(chunks)]


def _plan_official(src: inet.Source, subset: Subset) -> Plan:
    """The official archives: classes from the train tar's inner tars, validation labels from the devkit."""
    devkit = inet.read_devkit(src.files["devkit"])
    words = {s.wnid: s.words for s in devkit.classes}
    train_path = src.files["train"]
    inner = {}
    for m in _tar_index(train_path):
        stem = m.name.rsplit("/", 1)[-1].removesuffix(".tar")
        if m.isfile() and inet.WNID.fullmatch(stem):
            inner[stem] = m
    if not inner:
        raise DataError(f"{train_path} holds no per-class tars (<wnid>.tar); it is not the ILSVRC2012 train archive: download it again")
    unknown = sorted(set(inner) - set(words))
    if unknown:
        raise DataError(f"class {unknown[0]} of {train_path} is not a class of {src.files['devkit']}; use the devkit of the same year")
    chosen = _pick_classes(list(inner), subset)
    units = [Unit(f"train-{w}", "innertar", str(train_path), inner[w].size, (inner[w].offset_data, inner[w].size),
                  wnid=w, keep=subset.per_class) for w in chosen]
    val_path = src.files["val"]
    members = [(m.offset_data, m.size, m.name.rsplit("/", 1)[-1]) for m in _tar_index(val_path) if m.isfile()]
    units += _val_units(devkit.val_labels, set(chosen) if subset.classes else None, subset.val_per_class, members, str(val_path),
                        str(src.files["devkit"]))
    return Plan(chosen, words, units)


def _files_units(split_dir: Path, wnid: str, split: str, keep: int | None) -> Unit:
    """One class folder's images (the first `keep` by name) as a unit of copies."""
    names = sorted(e.name for e in os.scandir(split_dir / wnid) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    names = names[:keep]
    items = tuple((str(split_dir / wnid / n), split, wnid, n) for n in names)
    return Unit(f"{split}-{wnid}", "files", str(split_dir / wnid), sum(os.path.getsize(i[0]) for i in items), items, split, wnid)


def _class_dirs(folder: Path) -> list[str]:
    """Sorted sub-folder names."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def _plan_kaggle(src: inet.Source, subset: Subset) -> Plan:
    """Kaggle's tree: classes from train/<wnid>/, validation labels from LOC_val_solution.csv."""
    data = src.files["data"]
    words = dict(inet.parse_kaggle_synsets(src.files["synsets"].read_text(), str(src.files["synsets"])))
    labels = inet.parse_kaggle_val(src.files["csv"].read_text(), str(src.files["csv"]))
    chosen = _pick_classes(_class_dirs(data / "train"), subset)
    units = [_files_units(data / "train", w, "train", subset.per_class) for w in chosen]
    val = data / "val"
    members = [(0, e.stat().st_size, e.name) for e in os.scandir(val) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
    chosen_val = set(chosen) if subset.classes else None
    for u in _val_units(labels, chosen_val, subset.val_per_class, members, str(val), str(src.files["csv"])):
        items = tuple((str(val / name), split, wnid, name) for _, _, split, wnid, name in u.items)
        units.append(Unit(u.name, "files", str(val), u.size, items, "val"))
    return Plan(chosen, words, units)


def _plan_imagefolder(src: inet.Source, subset: Subset) -> Plan:
    """An ImageFolder tree already (a copy, or a subset of it): one unit per class folder and split."""
    chosen = _pick_classes(_class_dirs(src.files["train"]), subset)
    units = [_files_units(src.files[split], w, split, subset.per_class if split == "train" else subset.val_per_class)
             for split in SPLITS for w in (chosen if subset.classes else _class_dirs(src.files[split]))
             if (src.files[split] / w).is_dir()]
    return Plan(chosen, {}, units)


def _hf_val_wnids(path: Path) -> list[str]:
    """The classes of a Hugging Face validation tar, from its member names (one pass over the stream, data skipped)."""
    try:
        with tarfile.open(path, mode="r|*") as tar:
            return sorted({p[1] for m in tar if (p := inet.hf_member(m.name)) is not None})
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise damaged_error(str(path), exc) from exc


def _plan_hf(src: inet.Source, subset: Subset) -> Plan:
    """The Hugging Face tars: one unit per shard, labels from the member names. A subset's classes come from the
    validation tar's names; a shard holds any classes' files, so --per-class trims the class folders afterwards."""
    every = _hf_val_wnids(src.files["val"]) if subset.classes else []
    chosen = _pick_classes(every, subset) if subset.classes else []
    keep = tuple(chosen)
    units = [Unit(f"train-{p.name.split('.')[0]}", "targz", str(p), p.stat().st_size, wnids=keep) for p in src.train_tars]
    units.append(Unit("val", "targz", str(src.files["val"]), src.files["val"].stat().st_size, split="val", wnids=keep))
    return Plan(chosen, {}, units, trim=subset.per_class is not None or subset.val_per_class is not None,
                written_share=len(chosen) / len(every) if every else 1.0)


_PLANNERS: dict[str, Callable[[inet.Source, Subset], Plan]] = {
    "official": _plan_official, "kaggle": _plan_kaggle, "hf": _plan_hf, "imagefolder": _plan_imagefolder}


# ---------------------------------------------------------------------------------------------
# Checks up front: md5s, free space, the state of DEST.
# ---------------------------------------------------------------------------------------------


def verify_md5(src: inet.Source, expected: dict[str, str], state: Path) -> dict[str, str]:
    """Check the official archives' md5s (a file already checked, same size and mtime, is not read again)."""
    cache_file = state / "md5.json"
    cache = rundir.read_json(cache_file) or {}
    sums = {}
    for role in ("devkit", "val", "train"):
        path = src.files[role]
        st = path.stat()
        key = f"{path.name}:{st.st_size}:{st.st_mtime_ns}"
        md5 = cache.get(key) or inet.md5_of(path)
        want = expected.get(path.name)
        if want and md5 != want:
            raise DataError(f"{path}: md5 {md5} is not the published {want}; the download is damaged or another file: "
                            f"download it again (or pass --no-verify for a subset or copy you trust)")
        cache[key] = sums[path.name] = md5
        rundir.write_json(cache_file, cache)
    return sums


def check_space(dest: Path, need: int) -> None:
    """DataError unless the file system of dest has `need` bytes free."""
    free = shutil.disk_usage(dest).free
    if free < need:
        raise DataError(f"{dest} has {free / 1e9:.1f} GB free, prepare needs about {need / 1e9:.1f} GB more; "
                        f"free space or pick another --out")


def _plan_doc(src: inet.Source, opts: Options) -> dict[str, Any]:
    """What identifies this prepare (a restart must ask for the same): source, kind, subset, format (not --no-verify:
    a check skipped or passed leaves the same files)."""
    return {"format_version": FORMAT_VERSION, "source": str(src.root.resolve()), "kind": src.kind,
            "subset": asdict(opts.subset), "format": opts.fmt}


def _claim(dest: Path, doc: dict[str, Any]) -> bool:
    """Make dest ours (True: already prepared as asked, nothing to do); DataError for another dataset or a foreign folder."""
    state = dest / STATE
    done = rundir.read_json(dest / DATASET_JSON) if (dest / DATASET_JSON).exists() else None
    if done is not None:
        if done.get("prepared_with") == doc:
            shutil.rmtree(state, ignore_errors=True)  # killed between dataset.json and the clean-up: finish that
            return True
        raise DataError(f"{dest} already holds a prepared dataset ({dest / DATASET_JSON}) from another source or subset; "
                        f"pick another --out or delete {dest}")
    if state.exists():
        old = rundir.read_json(state / "plan.json")
        if old is not None and old != doc:
            raise DataError(f"{dest} holds an unfinished prepare of another source or subset ({state / 'plan.json'}); "
                            f"run that command again to finish it, or delete {dest}")
    elif dest.exists() and any(os.scandir(dest)):
        raise DataError(f"{dest} is not empty and is no prepare's; pick an empty or new --out (nothing is ever overwritten)")
    (state / "done").mkdir(parents=True, exist_ok=True)
    (state / "partial").mkdir(exist_ok=True)
    rundir.write_json(state / "plan.json", doc)
    return False


# ---------------------------------------------------------------------------------------------
# Running and finishing.
# ---------------------------------------------------------------------------------------------


def _trim(partial: Path, subset: Subset) -> None:
    """Keep the first per_class (val_per_class) files of each class by name: a Hugging Face subset, whose shards hold any
    class's files, is written whole and cut here."""
    for split, keep in (("train", subset.per_class), ("val", subset.val_per_class)):
        if keep is not None and (partial / split).is_dir():
            for wnid in _class_dirs(partial / split):
                for name in sorted(os.listdir(partial / split / wnid))[keep:]:
                    os.unlink(partial / split / wnid / name)


def _publish_classes(dest: Path, partial: Path) -> None:
    """Move each class folder from partial/ into dest/<split>/, a rename each (those moved before a kill are there)."""
    for split in SPLITS:
        (dest / split).mkdir(exist_ok=True)
        if (partial / split).is_dir():
            for wnid in _class_dirs(partial / split):
                os.replace(partial / split / wnid, dest / split / wnid)


def _check_counts(per_split: dict[str, dict[str, int]], source: str, opts: Options) -> None:
    """Every class in both splits; with verify, ImageNet-1k's counts (or the subset's classes)."""
    train, val = per_split["train"], per_split["val"]
    for a, b, name in ((train, val, "val"), (val, train, "train")):
        missing = sorted(set(a) - set(b))
        if missing:
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"class {missing[0]} has no {name} images in {source}{more}; the source is incomplete: "
                            f"download its {name} part again")
    if not opts.verify:
        return
    e, sub = opts.expected, opts.subset
    problems = []
    if len(train) != (sub.classes or e.classes):
        problems.append(f"{len(train)} classes, not {sub.classes or e.classes}")
    if sub.classes is None and sub.per_class is None and sum(train.values()) != e.train_images:
        problems.append(f"{sum(train.values()):,} train images, not {e.train_images:,}")
    if sub.classes is None and sub.val_per_class is None and sum(val.values()) != e.val_images:
        problems.append(f"{sum(val.values()):,} val images, not {e.val_images:,}")
    want_val = sub.val_per_class or e.val_per_class
    short = sorted(w for w, n in val.items() if n != want_val)
    if short:
        problems.append(f"class {short[0]} has {val[short[0]]} val images, not {want_val}")
    if problems:
        raise DataError(f"{source} is not all of ImageNet-1k: {'; '.join(problems)}; download the missing files again "
                        f"(or pass --no-verify for a subset or miniature)")


def _counts(*roots: Path) -> dict[str, dict[str, int]]:
    """split -> wnid -> image count over the class folders of the given roots (dest and partial: a resumed move)."""
    counts: dict[str, dict[str, int]] = {split: {} for split in SPLITS}
    for root in roots:
        for split in SPLITS:
            if (root / split).is_dir():
                for w in _class_dirs(root / split):
                    counts[split][w] = counts[split].get(w, 0) + len(os.listdir(root / split / w))
    return counts


def prepare(src: str | Path, dest: str | Path, opts: Options = Options()) -> dict[str, Any]:
    """Prepare the ImageNet source at src into the ImageFolder tree dest; return dataset.json's content."""
    try:
        return _prepare(src, dest, opts)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # a marker or dataset.json itself: the same resumable stop
            raise DiskFullError(f"disk full under {dest} ({exc.filename or 'a marker'}): prepare stopped, no {DATASET_JSON} "
                                f"written; free space (or pick another --out) and run the same command again: it resumes") from exc
        raise


def _prepare(src: str | Path, dest: str | Path, opts: Options) -> dict[str, Any]:
    """prepare's body."""
    if opts.fmt not in FORMATS:
        raise DataError(f"--format {opts.fmt}: use one of {', '.join(FORMATS)}")
    if opts.fmt == "tar":
        return _prepare_tar(src, Path(dest).expanduser(), opts)
    for flag, n in (("--classes", opts.subset.classes), ("--per-class", opts.subset.per_class),
                    ("--val-per-class", opts.subset.val_per_class), ("--workers", opts.workers)):
        if n is not None and n < (0 if flag == "--workers" else 1):
            raise DataError(f"{flag} {n}: give a positive number" + (" (or 0: the CPU budget)" if flag == "--workers" else ""))
    source = inet.detect_source(src)
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    doc = _plan_doc(source, opts)
    if _claim(dest, doc):
        return rundir.read_json(dest / DATASET_JSON) or {}
    state = dest / STATE
    partial = state / "partial"
    remove_temporaries(partial)
    if opts.verify and source.kind == "official" and opts.progress:
        size = sum(p.stat().st_size for p in source.files.values())
        print(f"prepare: checking the archives' md5s ({size / 1e9:.1f} GB; --no-verify skips it)", file=sys.stderr, flush=True)
    md5s = verify_md5(source, opts.expected.md5, state) if opts.verify and source.kind == "official" else {}
    plan = _PLANNERS[source.kind](source, opts.subset)
    done = {p.stem for p in (state / "done").glob("*.json")}
    left = sum(u.size for u in plan.units if u.name not in done)
    check_space(dest, int(left * plan.written_share * SPACE_MARGIN))
    workers = opts.workers or usable_cores()[0]
    records = run_units(plan.units, state, workers, opts.progress)
    if plan.trim:
        _trim(partial, opts.subset)
    _check_counts(_counts(dest, partial), str(source.root), opts)  # before a class moves: a failed check leaves no tree
    _publish_classes(dest, partial)
    info = scan_layout(dest).info
    odd = {rel: kind for rec in records for rel, kind in rec["odd"].items() if (dest / rel).exists()}
    subset = opts.subset
    result = {
        "format_version": FORMAT_VERSION,
        "format": opts.fmt,
        "source": {"kind": source.kind, "path": str(source.root.resolve()), "md5": md5s},
        "classes": len(info.classes),
        "train_images": info.train_images,
        "val_images": info.val_images,
        "fingerprint": info.fingerprint,
        "verified": opts.verify,
        "imagenet_1k": not subset.active() and opts.verify,
        "subset": ({**asdict(subset), "of": "ImageNet-1k", "name": subset_name(subset),
                    "rule": "classes evenly spaced over the sorted wnids; the first files of each class by name"}
                   if subset.active() else None),
        "odd_files": dict(sorted(odd.items())),
        "wnids": list(info.classes),
        "words": {w: plan.words[w] for w in info.classes if w in plan.words},
        "resumed_images": sum(r.get("skipped", 0) for r in records),
        "prepared_with": doc,
    }
    rundir.write_json(dest / DATASET_JSON, result)  # last: a dest with dataset.json is complete
    shutil.rmtree(state, ignore_errors=True)
    return result


def _prepare_tar(src: str | Path, dest: Path, opts: Options) -> dict[str, Any]:
    """--format tar: prepare the tree into DEST/.tree (verified, resumable as ever), write it as indexed tar shards
    into DEST (each shard renamed into place whole), then dataset.json, last, and the staging tree goes."""
    from ablation.data.shards import write_shards

    doc = _plan_doc(inet.detect_source(src), opts)
    done = rundir.read_json(dest / DATASET_JSON) if (dest / DATASET_JSON).exists() else None
    if done is not None:
        if done.get("prepared_with") == doc:
            return done
        raise DataError(f"{dest} already holds a prepared dataset ({dest / DATASET_JSON}) from another source, subset or format; "
                        f"pick another --out or delete {dest}")
    if dest.exists() and not (dest / STAGING).exists() and any(os.scandir(dest)):
        raise DataError(f"{dest} is not empty and is no prepare's; pick an empty or new --out (nothing is ever overwritten)")
    staging = dest / STAGING
    tree_doc = prepare(src, staging, replace(opts, fmt="tree"))
    write_shards(staging, dest, record=False)  # dataset.json comes last, below: until then the prepare is unfinished
    result = {**tree_doc, "format": "tar", "prepared_with": doc,
              "shards": sorted(p.name for p in dest.glob("*.tar"))}
    rundir.write_json(dest / DATASET_JSON, result)  # last: a dest with dataset.json is complete
    shutil.rmtree(staging, ignore_errors=True)
    return result


def subset_name(subset: Subset) -> str:
    """A short name of a subset, e.g. 'ImageNet-100 (100 classes, 260 train / 50 val per class)'."""
    n = f"ImageNet-{subset.classes}" if subset.classes else "ImageNet-1k subset"
    train = f"{subset.per_class} train" if subset.per_class else "all train"
    val = f"{subset.val_per_class} val" if subset.val_per_class else "all val"
    return f"{n} ({train} / {val} images per class)"


def read_dataset_json(root: str | Path) -> dict[str, Any] | None:
    """DEST/dataset.json of a prepared tree, None where there is none."""
    return rundir.read_json(Path(root) / DATASET_JSON)


def summary_line(dest: str | Path, doc: dict[str, Any]) -> str:
    """What prepare printed at the end: where, how many, from what, the fingerprint, the odd files."""
    sub = doc.get("subset")
    what = sub["name"] if sub else ("ImageNet-1k, counts and md5s verified" if doc.get("imagenet_1k") else "not verified (--no-verify)")
    odd = doc.get("odd_files") or {}
    kinds = sorted(set(odd.values()))
    return (f"{dest}: {doc['classes']} classes, {doc['train_images']:,} train / {doc['val_images']:,} val images from "
            f"{inet.KIND_NAMES[doc['source']['kind']]}; {what}; fingerprint {doc['fingerprint']}"
            + (f"; {len(odd)} image(s) not RGB JPEG ({', '.join(kinds)}: decoded to RGB, listed in {DATASET_JSON})" if odd else ""))


def describe(root: str | Path) -> str:
    """`ablation data check`: an ImageFolder tree's summary (and how it was prepared), or what an ImageNet download is
    and the command that prepares it; DataError for an unfinished prepare or a folder that is neither."""
    from ablation.data.layout import check_layout

    root = Path(root).expanduser()
    if (root / STATE).is_dir() and not (root / DATASET_JSON).exists():
        plan = rundir.read_json(root / STATE / "plan.json") or {}
        raise DataError(f"{root} is an unfinished prepare (no {DATASET_JSON} yet); finish it: ablation data prepare imagenet "
                        f"{plan.get('source', 'SRC')} --out {root} (the same options as before)")
    try:
        source = inet.detect_source(root) if root.is_dir() else None
    except DataError:
        if not ((root / "train").exists() or (root / "val").exists()):
            raise
        source = None  # half an ImageFolder tree: the layout check says what is missing
    if source is not None and source.kind != "imagefolder":
        return (f"{source.describe()} (not an ImageFolder tree yet); prepare it: ablation data prepare imagenet {root} "
                f"--out DEST, then train with data.root=DEST")
    info = check_layout(root)
    line = (f"{info.root}: {len(info.classes)} classes, {info.train_images} train / {info.val_images} val images, "
            f"fingerprint {info.fingerprint}")
    doc = read_dataset_json(root)
    if doc:
        sub = doc.get("subset")
        line += f"; prepared from {inet.KIND_NAMES.get(doc.get('source', {}).get('kind'), 'a source')}"
        line += f", a subset: {sub['name']}" if sub else (", ImageNet-1k (verified)" if doc.get("imagenet_1k") else ", not verified")
        if doc.get("fingerprint") != info.fingerprint:
            line += f"; its files changed since (dataset.json's fingerprint {doc.get('fingerprint')})"
    return line
