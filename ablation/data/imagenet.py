"""The ImageNet-1k (ILSVRC2012) sources users hold: their names, known counts and checksums, and their label parsers.

Torch-free. Recognises what a source folder holds (the official archives, Kaggle's tree, the Hugging Face tars, or
an ImageFolder tree already) and reads the labels each one gives the validation images, always as wnids: the
ILSVRC2012_ID order of the devkit is not the sorted-wnid order that ImageFolder's class indices follow, so an
ID is mapped to its wnid and a wnid to its index (class_index), never ID - 1 to an index.
Facts: /work/shared/reference/imagenet-layouts.md (counts; md5s as torchvision's datasets/imagenet.py checks them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ablation.errors import DataError

# ---------------------------------------------------------------------------------------------
# Names and known facts.
# ---------------------------------------------------------------------------------------------

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
META_MAT = "data/meta.mat"  # inside the devkit, under its top folder ILSVRC2012_devkit_t12/
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
# The published md5s of the official downloads, as torchvision's datasets/imagenet.py checks them.
MD5 = {TRAIN_TAR: "1d675b47d978889d74fa0da5fadfb00e",
       VAL_TAR: "29b22e2961454d5413ddabcf34fc5622",
       DEVKIT: "fa75699e90414af021442c21a62c3abf"}

KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"  # holds train/<wnid>/ and val/ (flat)
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"

HF_TRAIN_GLOB = "train_images_*.tar.gz"  # train_images_0 .. train_images_4, in data/ of the repository
HF_VAL = "val_images.tar.gz"

# ImageNet-1k's known counts: what `prepare` verifies unless --no-verify (subsets, miniatures).
CLASSES = 1000
TRAIN_IMAGES = 1_281_167
VAL_IMAGES = 50_000
VAL_PER_CLASS = 50

KINDS = ("official", "kaggle", "hf", "imagefolder")
KIND_NAMES = {"official": "the official ILSVRC2012 archives", "kaggle": "Kaggle's ILSVRC tree",
              "hf": "the Hugging Face imagenet-1k tars", "imagefolder": "an ImageFolder tree (train/<class>/, val/<class>/)"}

WNID = re.compile(r"n\d{8}")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
_HF_NAME = re.compile(r"(?P<stem>.+)_(?P<wnid>n\d{8})(?P<ext>\.[A-Za-z]+)")


def class_index(wnids: Iterable[str]) -> dict[str, int]:
    """wnid -> ImageFolder class index: the position in sorted-wnid order (what torchvision's find_classes gives)."""
    return {w: i for i, w in enumerate(sorted(set(wnids)))}


def val_name(k: int) -> str:
    """The official file name of validation image k (1-based): ILSVRC2012_val_00000001.JPEG ..."""
    return f"ILSVRC2012_val_{k:08d}.JPEG"


# ---------------------------------------------------------------------------------------------
# What a source folder holds.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A recognised ImageNet source: its kind and the files it is read from (paths keyed by role)."""

    kind: str  # one of KINDS
    root: Path
    files: dict[str, Path] = field(default_factory=dict)  # official: train, val, devkit; kaggle: data, csv, synsets; hf: val
    train_tars: tuple[Path, ...] = ()  # hf: the train_images_*.tar.gz, sorted

    def describe(self) -> str:
        """One line: what was found where."""
        return f"{self.root}: {KIND_NAMES[self.kind]}"


def _first(root: Path, names: Iterable[str]) -> Path | None:
    """The first of root/name that exists."""
    for name in names:
        if (root / name).exists():
            return root / name
    return None


def _official(root: Path) -> Source | None:
    """The three official archives in root, or None if none of them is; DataError naming the missing one(s)."""
    found = {role: root / name for role, name in (("train", TRAIN_TAR), ("val", VAL_TAR), ("devkit", DEVKIT)) if (root / name).is_file()}
    if not found:
        return None
    missing = [name for role, name in (("train", TRAIN_TAR), ("val", VAL_TAR), ("devkit", DEVKIT)) if role not in found]
    if missing:
        raise DataError(f"{root} holds {', '.join(p.name for p in found.values())} but not {', '.join(missing)}; "
                        f"put all three official ILSVRC2012 archives (train, val, devkit) in one folder")
    return Source("official", root, found)


def _kaggle(root: Path) -> Source | None:
    """Kaggle's tree (root is the folder holding ILSVRC/ and the LOC_*.{csv,txt} files), or None."""
    data = root / KAGGLE_DATA
    if not data.is_dir():
        return None
    files = {"data": data}
    for role, name in (("csv", KAGGLE_VAL_CSV), ("synsets", KAGGLE_SYNSETS)):
        if not (root / name).is_file():
            raise DataError(f"{root / name} is missing; Kaggle's ImageNet download has it beside ILSVRC/: put it back "
                            f"(it labels the validation images)")
        files[role] = root / name
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise DataError(f"{data / split} is missing; Kaggle's tree holds {KAGGLE_DATA}/train/<wnid>/ and {KAGGLE_DATA}/val/")
    return Source("kaggle", root, files)


def _hf(root: Path) -> Source | None:
    """The Hugging Face tars (in root or root/data), or None."""
    for folder in (root, root / "data"):
        trains = tuple(sorted(folder.glob(HF_TRAIN_GLOB)))
        val = folder / HF_VAL
        if trains or val.is_file():
            if not trains or not val.is_file():
                have = ", ".join(p.name for p in (*trains, *([val] if val.is_file() else [])))
                raise DataError(f"{folder} holds {have} but not {'the train_images_*.tar.gz' if not trains else HF_VAL}; "
                                f"download every tar of the Hugging Face imagenet-1k data/ folder")
            return Source("hf", root, {"val": val}, trains)
    return None


def detect_source(root: str | Path) -> Source:
    """What root holds: the official archives, Kaggle's tree, the HF tars or an ImageFolder tree; DataError if none."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageNet source {root} is not a folder; point it at the folder holding the downloaded "
                        f"archives ({TRAIN_TAR}, {VAL_TAR}, {DEVKIT}), Kaggle's ILSVRC/ tree or the Hugging Face tars")
    for probe in (_official, _kaggle, _hf):
        source = probe(root)
        if source is not None:
            return source
    if (root / "train").is_dir() and (root / "val").is_dir():
        return Source("imagefolder", root, {"train": root / "train", "val": root / "val"})
    if any(root.glob("*.parquet")) or any(root.glob("data/*.parquet")):
        raise DataError(f"{root} holds parquet files: the newer Hugging Face imagenet-1k revisions, which this harness does not "
                        f"read; download the older revision's data/*.tar.gz, or the official archives")
    raise DataError(f"{root} holds no ImageNet source this harness knows: expected the official archives ({TRAIN_TAR}, "
                    f"{VAL_TAR}, {DEVKIT}), Kaggle's {KAGGLE_DATA}/ with {KAGGLE_VAL_CSV}, the Hugging Face "
                    f"{HF_TRAIN_GLOB} and {HF_VAL}, or an ImageFolder tree (train/, val/)")


# ---------------------------------------------------------------------------------------------
# The devkit.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Synset:
    """One row of the devkit's meta.mat synsets (the fields a reader needs)."""

    ilsvrc_id: int  # ILSVRC2012_ID, 1-based; 1..1000 are the leaves (the classes)
    wnid: str
    words: str
    num_children: int


@dataclass(frozen=True)
class Devkit:
    """The devkit's synsets and the validation labels: file name (ILSVRC2012_val_<k>.JPEG) -> wnid."""

    synsets: tuple[Synset, ...]
    val_labels: dict[str, str]

    @property
    def classes(self) -> tuple[Synset, ...]:
        """The leaf synsets (num_children == 0): ImageNet-1k's classes, in ILSVRC2012_ID order."""
        return tuple(s for s in self.synsets if s.num_children == 0)


def parse_meta_mat(data: bytes, where: str = "meta.mat") -> tuple[Synset, ...]:
    """The synsets of a devkit's meta.mat (MATLAB v5, as scipy.io reads it); DataError for another year's devkit."""
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)
    except (ValueError, TypeError, OSError, EOFError, NotImplementedError) as exc:
        raise DataError(f"cannot read {where}: {exc}; download {DEVKIT} again") from exc
    synsets = mat.get("synsets")
    names = synsets.dtype.names if isinstance(synsets, np.ndarray) and synsets.dtype.names else ()
    if "ILSVRC2012_ID" not in names:
        other = next((n for n in names if re.fullmatch(r"ILSVRC\d{4}_ID", n)), None)
        fields = ", ".join(names) or "none"
        year = f"it is from {other[6:10]} (field {other})" if other else f"it has no synsets with an ILSVRC2012_ID field (fields: {fields})"
        raise DataError(f"{where} is not the ILSVRC2012 devkit's: {year}; use {DEVKIT}, the devkit of ImageNet-1k 2012")
    missing = [f for f in ("WNID", "words", "num_children") if f not in names]
    if missing:
        raise DataError(f"{where} synsets lack the field(s) {', '.join(missing)}; download {DEVKIT} again")
    rows = np.atleast_1d(synsets)
    return tuple(Synset(int(r["ILSVRC2012_ID"]), str(r["WNID"]), str(r["words"]), int(r["num_children"])) for r in rows)


def parse_ground_truth(text: str, synsets: tuple[Synset, ...], where: str = GROUND_TRUTH) -> dict[str, str]:
    """Validation file name -> wnid from the ground-truth lines (line k: the ILSVRC2012_ID of image k)."""
    by_id = {s.ilsvrc_id: s.wnid for s in synsets if s.num_children == 0}
    labels = {}
    for k, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token.isdigit() or int(token) not in by_id:
            raise DataError(f"{where} line {k}: {token!r} is not the ILSVRC2012_ID of a class in meta.mat; "
                            f"download {DEVKIT} again")
        labels[val_name(k)] = by_id[int(token)]
    if not labels:
        raise DataError(f"{where} is empty; download {DEVKIT} again")
    return labels


def _devkit_member(tar: tarfile.TarFile, suffix: str, path: Path) -> bytes:
    """The bytes of the devkit member whose name ends in suffix; DataError naming what is missing."""
    for member in tar.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            f = tar.extractfile(member)
            assert f is not None  # a regular file always has data
            return f.read()
    names = [m.name for m in tar.getmembers() if m.name.endswith(("meta.mat", "ground_truth.txt"))]
    hint = f" (it holds {', '.join(names)}: a devkit of another year?)" if names else ""
    raise DataError(f"{path} has no {suffix}{hint}; use {DEVKIT}, the devkit of ImageNet-1k 2012")


def read_devkit(path: str | Path) -> Devkit:
    """Parse the devkit archive (ILSVRC2012_devkit_t12.tar.gz) into synsets and validation labels."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            # meta.mat first: another year's devkit is named as such by its ID field, before its other file names
            synsets = parse_meta_mat(_devkit_member(tar, META_MAT, path), f"{path}:{META_MAT}")
            truth = _devkit_member(tar, GROUND_TRUTH.rsplit("/", 1)[1], path)
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {' '.join(str(exc).split())}; the archive is damaged: download it again") from exc
    return Devkit(synsets, parse_ground_truth(truth.decode("ascii", "replace"), synsets, f"{path}:{GROUND_TRUTH}"))


# ---------------------------------------------------------------------------------------------
# Kaggle and Hugging Face.
# ---------------------------------------------------------------------------------------------


def parse_kaggle_synsets(text: str, where: str = KAGGLE_SYNSETS) -> list[tuple[str, str]]:
    """(wnid, words) per line of LOC_synset_mapping.txt."""
    rows = []
    for k, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not WNID.fullmatch(wnid):
            raise DataError(f"{where} line {k}: {wnid!r} is not a wnid (nXXXXXXXX); download Kaggle's {KAGGLE_SYNSETS} again")
        rows.append((wnid, words))
    return rows


def parse_kaggle_val(text: str, where: str = KAGGLE_VAL_CSV) -> dict[str, str]:
    """Validation file name -> wnid from LOC_val_solution.csv (ImageId, PredictionString: '<wnid> x y x y ...')."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise DataError(f"{where} has no ImageId,PredictionString header; download Kaggle's {KAGGLE_VAL_CSV} again")
    labels = {}
    for k, row in enumerate(reader, start=2):
        tokens = (row.get("PredictionString") or "").split()
        if not tokens or not WNID.fullmatch(tokens[0]):
            raise DataError(f"{where} line {k}: no wnid in PredictionString for {row.get('ImageId')!r}; "
                            f"download Kaggle's {KAGGLE_VAL_CSV} again")
        labels[f"{row['ImageId']}.JPEG"] = tokens[0]
    return labels


def hf_member(name: str) -> tuple[str, str] | None:
    """(file name, wnid) of a Hugging Face tar member '<stem>_<wnid>.JPEG' (folders dropped), else None.

    'ILSVRC2012_val_00000293_n01440764.JPEG' -> ('ILSVRC2012_val_00000293.JPEG', 'n01440764');
    'n01440764_10026_n01440764.JPEG' -> ('n01440764_10026.JPEG', 'n01440764').
    """
    m = _HF_NAME.fullmatch(name.rsplit("/", 1)[-1])
    return (m["stem"] + m["ext"], m["wnid"]) if m else None


def md5_of(path: str | Path) -> str:
    """md5 hex of a file, read in 1 MiB blocks (what the published checksums are)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
