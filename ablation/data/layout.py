"""The dataset on disk: ImageFolder layout checks and scans, and reading its image files.

One walk of the folders gives the summary (classes, counts, a content-free fingerprint) and every split's
file list, in torchvision's order; image files are read to RGB, or fail with one line naming the file.
A folder of archives (archives.py) is scanned from its index instead, into the same classes, file names and
order as its extracted tree: a sample's source is then an archive member, not a path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from ablation.data import archives
from ablation.data.members import Member, Source, read_source
from ablation.errors import DataError
from ablation.gcpause import gc_paused

SPLITS: tuple[str, ...] = ("train", "val")
DATASET_JSON = "dataset.json"  # what `ablation data prepare` writes beside train/ and val/ (ablation.data.prepare)


# ---------------------------------------------------------------------------------------------
# Layout check.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """What check_layout found: class names, image counts and a cheap content-free fingerprint."""

    root: str
    classes: tuple[str, ...]
    train_images: int
    val_images: int
    fingerprint: str  # sha256 (first 16 hex) over class names and relative file names
    layout: str = "imagefolder"  # or archives.OFFICIAL / archives.SHARDS: read in place (the same fingerprint as the tree)
    subset: str | None = None  # a prepared subset's name (DATASET_JSON's subset), so that a report never takes it for ImageNet-1k


def _is_image(name: str) -> bool:
    """True for the file names torchvision's ImageFolder loads (case-insensitive extension)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class folder names of a split, as torchvision's find_classes lists them."""
    with os.scandir(split_dir) as it:
        return sorted(entry.name for entry in it if entry.is_dir())


def _image_files(folder: str, prefix: str) -> Iterator[str]:
    """Relative names of image files under folder, recursively (ImageFolder follows links too)."""
    with os.scandir(folder) as it:
        entries = list(it)
    for entry in entries:
        # is_dir() and the name test use the cached d_type: no stat per file on 1.3M files.
        if entry.is_dir():
            yield from _image_files(entry.path, f"{prefix}{entry.name}/")
        elif _is_image(entry.name):
            yield prefix + entry.name


def class_images(class_dir: Path) -> list[str]:
    """A class folder's image files (names relative to it, nested ones too), in torchvision's make_dataset order."""
    return sorted(_image_files(str(class_dir), ""), key=_walk_order)


def require_dir(path: Path, what: str, fix: str) -> None:
    """Raise a one-line DataError unless path is an existing folder."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; {fix}")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder; {fix}")


def _scan_split(root: Path, split: str, digest: Any) -> tuple[list[str], list[tuple[str, ...]]]:
    """Class names and, per class, its image files (relative to the class folder, in torchvision's
    order); feeds the split-relative file names into digest."""
    split_dir = root / split  # exists: check_splits ran first
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders; put each class's images in its own "
                        f"sub-folder, e.g. {split_dir}/<class>/<image>.JPEG")
    per_class = []
    for name in classes:
        files = sorted(_image_files(str(split_dir / name), ""))
        if not files:
            exts = ", ".join(IMG_EXTENSIONS)
            raise DataError(f"class folder {split_dir / name} has no image files ({exts}); "
                            f"add images or remove the folder")
        prefix = f"{split}/{name}/"
        digest.update(("\n".join(prefix + f for f in files) + "\n").encode("utf-8", "surrogateescape"))
        per_class.append(tuple(sorted(files, key=_walk_order)))
    return classes, per_class


def _walk_order(name: str) -> tuple[str, str]:
    """Sort key giving torchvision's make_dataset order: by folder (as sorted(os.walk) lists them), then name.

    The fingerprint keeps plain sorted order; sample indices (which seed the augmentation) keep
    torchvision's, which differs for nested folders ('b/x.jpg' sorts before 'z.jpg', but os.walk
    yields the class folder's own files first).
    """
    folder, _, base = name.rpartition("/")
    return folder, base


def _few(names: list[str], limit: int = 3) -> str:
    """First few names, and how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_same_classes(root: Path, train: list[str], val: list[str], archive_folder: bool = False) -> None:
    """Raise DataError naming a few classes found in only one split (of a tree, or of an archive folder's index)."""
    if train == val:
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    parts = []
    if only_train:
        parts.append(f"missing in val: {_few(only_train)}")
    if only_val:
        parts.append(f"missing in train: {_few(only_val)}")
    if archive_folder:
        raise DataError(f"the train and val archives of {root} hold different classes ({'; '.join(parts)}); "
                        "put the archives of one dataset there (both splits), then run `ablation data index` again")
    raise DataError(f"class folders differ between {root}/train and {root}/val ({'; '.join(parts)}); "
                    f"give both splits the same class folders")


def check_splits(root: str | Path) -> None:
    """Cheap check (no file walk) that root holds train/ and val/ folders, or the archives of both: for a sweep before it submits."""
    root = Path(root).expanduser()
    if archives.archive_kind(root):
        archives.check_archives(root)
        return
    require_dir(root, "dataset folder", "point data.root at a folder holding train/ and val/ "
                 "in ImageNet (ImageFolder) layout")
    for split in SPLITS:
        require_dir(root / split, f"{split} split folder", f"put one sub-folder per class under {root}/{split}")


@dataclass(frozen=True)
class DatasetScan:
    """What one walk of the dataset found: the summary and every split's file list.

    The trainer walks the folders once per start, on rank 0, and hands the lists to the other ranks
    (loaders.scan_dataset), instead of every rank walking them twice (check_layout, then ImageFolder).
    """

    info: DatasetInfo
    files: dict[str, tuple[tuple[str, ...], ...]]  # split -> per class: names relative to the class folder
    members: dict[str, tuple[tuple[Member, ...], ...]] | None = None  # archive folder: files' members, in files' order

    def samples(self, split: str) -> list[tuple[Source, int]]:
        """(source, class index) of every image of a split, as torchvision's make_dataset lists them: its path in a
        tree, its archive member in an archive folder."""
        if self.members is not None:
            return [(m, target) for target, ms in enumerate(self.members[split]) for m in ms]
        split_dir = os.path.join(self.info.root, split)
        return [(os.path.join(split_dir, cls, name), target)
                for target, (cls, names) in enumerate(zip(self.info.classes, self.files[split]))
                for name in names]

    def split_fingerprint(self, split: str) -> str:
        """sha256 (first 16 hex) over a split's images in sample order, one "<split>/<class>/<file>\t<class index>" line
        each: what identifies the validation set of per-image results (info.fingerprint covers both splits)."""
        digest = hashlib.sha256()
        for target, (cls, names) in enumerate(zip(self.info.classes, self.files[split])):
            digest.update("".join(f"{split}/{cls}/{name}\t{target}\n" for name in names).encode("utf-8", "surrogateescape"))
        return digest.hexdigest()[:16]


def scan_layout(root: str | Path, log: Callable[[str], None] | None = None) -> DatasetScan:
    """check_layout's checks and summary, plus the file lists it walked (or read from an archive folder's index;
    log(message) hears when that index had to be built first)."""
    root = Path(root).expanduser()
    if archives.archive_kind(root):
        return scan_archives(archives.ensure_index(root, log))
    check_splits(root)
    digest = hashlib.sha256()
    scans = {}
    for split in SPLITS:
        digest.update(f"[{split}]\n".encode())
        scans[split] = _scan_split(root, split, digest)
    (train, train_files), (val, val_files) = scans["train"], scans["val"]
    _check_same_classes(root, train, val)
    digest.update(("[classes]\n" + "\n".join(train) + "\n").encode("utf-8", "surrogateescape"))
    info = DatasetInfo(root=str(root), classes=tuple(train), train_images=sum(map(len, train_files)),
                       val_images=sum(map(len, val_files)), fingerprint=digest.hexdigest()[:16], subset=prepared_subset(root))
    return DatasetScan(info, {"train": tuple(train_files), "val": tuple(val_files)})


def scan_archives(index: archives.ArchiveIndex) -> DatasetScan:
    """The scan of an archive folder: its tree's classes, names, order and fingerprint, with each file's member."""
    with gc_paused():
        return _scan_archives(index)


def _scan_archives(index: archives.ArchiveIndex) -> DatasetScan:
    """scan_archives's work, with the garbage collector paused."""
    digest = hashlib.sha256()
    classes: dict[str, list[str]] = {}
    files: dict[str, tuple[tuple[str, ...], ...]] = {}
    members: dict[str, tuple[tuple[Member, ...], ...]] = {}
    where = f"{index.root} (index {index.path})"
    for split in SPLITS:
        digest.update(f"[{split}]\n".encode())
        per_class = index.splits.get(split, {})
        classes[split] = sorted(per_class)
        if not classes[split]:
            raise DataError(f"{where} has no {split} images; put the {split} archive(s) there and run "
                            f"`ablation data index {index.root}` again")
        names_of, members_of = [], []
        for name in classes[split]:
            rows = {rel: m for rel, m in per_class[name] if _is_image(rel)}
            if not rows:
                raise DataError(f"class {name} of {where} has no {split} image files; re-index, or remove the class")
            prefix = f"{split}/{name}/"
            digest.update(("\n".join(prefix + f for f in sorted(rows)) + "\n").encode("utf-8", "surrogateescape"))
            ordered = tuple(sorted(rows, key=_walk_order))
            names_of.append(ordered)
            members_of.append(tuple(rows[f] for f in ordered))
        files[split], members[split] = tuple(names_of), tuple(members_of)
    _check_same_classes(Path(index.root), classes["train"], classes["val"], archive_folder=True)
    digest.update(("[classes]\n" + "\n".join(classes["train"]) + "\n").encode("utf-8", "surrogateescape"))
    info = DatasetInfo(root=index.root, classes=tuple(classes["train"]), train_images=sum(map(len, files["train"])),
                       val_images=sum(map(len, files["val"])), fingerprint=digest.hexdigest()[:16], layout=index.kind,
                       subset=prepared_subset(Path(index.root)))
    return DatasetScan(info, files, members)


def prepared_subset(root: Path) -> str | None:
    """The subset name in root/dataset.json where `ablation data prepare` wrote a subset there; None otherwise
    (no file, a full copy, or a file that does not parse: the counts alone then say what the data are)."""
    try:
        doc = json.loads((root / DATASET_JSON).read_text())
    except (OSError, ValueError):
        return None
    sub = doc.get("subset") if isinstance(doc, dict) else None
    return str(sub.get("name") or "a subset") if isinstance(sub, dict) else None


def check_layout(root: str | Path) -> DatasetInfo:
    """Check root has train/ and val/ with the same non-empty class folders; return counts."""
    return scan_layout(root).info


# ---------------------------------------------------------------------------------------------
# Reading images.
# ---------------------------------------------------------------------------------------------


READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)  # what a damaged image file raises


def unreadable_error(src: Source, exc: BaseException) -> DataError:
    """The one-line error for an image file (or archive member) that cannot be read."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(src, Member):
        return DataError(f"cannot read image {src}: {reason}; the archive is damaged: download it again (or write it again), "
                         f"then run `ablation data index {os.path.dirname(src.archive)}`")
    return DataError(f"cannot read image {src}: {reason}; replace or delete the file")


def _open(src: Source) -> Image.Image:
    """PIL's image of a path, or of an archive member's bytes (read by offset)."""
    return Image.open(io.BytesIO(read_source(src)) if isinstance(src, Member) else src)


def load_rgb(src: Source) -> Image.Image:
    """Open an image file (or archive member) as RGB, or raise a one-line DataError naming it."""
    try:
        with _open(src) as img:
            return img.convert("RGB")
    except READ_ERRORS as exc:
        raise unreadable_error(src, exc) from exc


def open_image(src: Source) -> Image.Image:
    """Open an image file (or archive member) reading its header only (size, format): the caller decodes, at the scale it needs."""
    try:
        return _open(src)
    except READ_ERRORS as exc:
        raise unreadable_error(src, exc) from exc

