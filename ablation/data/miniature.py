"""Miniatures of the ImageNet sources: the real names and structure, a few real small JPEG files. Torch-free.

For tests, benchmarks and trying `ablation data prepare` without the 150 GB download. Every layout of one
MiniSpec holds the same images with the same labels (expected_tree says which), so each layout must prepare
to the same ImageFolder tree. Like the real data, a miniature's devkit numbers its classes (ILSVRC2012_ID)
in an order that is not the sorted-wnid order, its meta.mat holds inner synsets besides the leaves, and its
train set holds a CMYK JPEG and a PNG file named `.JPEG`. Archives are written byte-reproducibly (fixed
mtimes, owners and gzip header), so one spec gives the same md5s anywhere.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ablation.data import imagenet as inet
from ablation.data.synth import MAX_CLASSES, SynthSpec, encode_jpeg, render_image

LAYOUTS = ("official", "kaggle", "hf", "imagefolder")
# Real wnids and words of ImageNet-1k's first classes in sorted order; more classes get made-up wnids.
_REAL = (("n01440764", "tench, Tinca tinca"), ("n01443537", "goldfish, Carassius auratus"),
         ("n01484850", "great white shark, white shark"), ("n01491361", "tiger shark, Galeocerdo cuvieri"),
         ("n01494475", "hammerhead, hammerhead shark"), ("n01496331", "electric ray, crampfish"),
         ("n01498041", "stingray"), ("n01514668", "cock"), ("n01514859", "hen"), ("n01518878", "ostrich, Struthio camelus"))
_INNER = (("n00001740", "entity"), ("n00002684", "object, physical object"))  # meta.mat's non-leaf synsets (860 in the real one)
_MTIME = 1_338_508_800  # 2012-06-01: archive member times, fixed so that the md5s are reproducible


@dataclass(frozen=True)
class MiniSpec:
    """What a miniature holds: classes x images per split, image size, seed; the odd files on or off."""

    classes: int = 4
    train_per_class: int = 3
    val_per_class: int = 2
    size: int = 32
    seed: int = 0
    odd_files: bool = True  # train image 0 of class 0 a CMYK JPEG, of class 1 a PNG named .JPEG


def wnids(spec: MiniSpec) -> list[str]:
    """The miniature's wnids, sorted (ImageFolder's class order)."""
    real = [w for w, _ in _REAL[: spec.classes]]
    return real + [f"n{99000000 + i:08d}" for i in range(len(real), spec.classes)]


def words(wnid: str) -> str:
    """A wnid's words (made-up ones for made-up wnids)."""
    return dict(_REAL).get(wnid, f"class {wnid}")


def ilsvrc_ids(spec: MiniSpec) -> dict[str, int]:
    """wnid -> ILSVRC2012_ID (1-based): reversed sorted order, so that ID - 1 is never the class index for 2+ classes."""
    return {w: spec.classes - i for i, w in enumerate(wnids(spec))}


def train_name(wnid: str, j: int) -> str:
    """The official name of train image j of a class: '<wnid>_<n>.JPEG' (n not contiguous, as in ImageNet)."""
    return f"{wnid}_{10 + 7 * j}.JPEG"


def val_wnids(spec: MiniSpec) -> list[str]:
    """The wnid of validation image k (index k - 1): classes interleaved in a seeded order, as ImageNet's are."""
    labels = [w for w in wnids(spec) for _ in range(spec.val_per_class)]
    order = np.random.default_rng([spec.seed, 7]).permutation(len(labels))
    return [labels[i] for i in order]


def odd_files(spec: MiniSpec) -> dict[str, str]:
    """'train/<wnid>/<file>' -> what it really is ('CMYK JPEG', 'PNG'), of the files that are not RGB JPEGs."""
    if not spec.odd_files:
        return {}
    ws = wnids(spec)
    odd = {f"train/{ws[0]}/{train_name(ws[0], 0)}": "CMYK JPEG"}
    if len(ws) > 1:
        odd[f"train/{ws[1]}/{train_name(ws[1], 0)}"] = "PNG"
    return odd


def _encode(pixels: np.ndarray, kind: str | None) -> bytes:
    """The file bytes: a baseline RGB JPEG, or the odd kind's."""
    if kind is None:
        return encode_jpeg(pixels, 90)
    buf = io.BytesIO()
    if kind == "PNG":
        Image.fromarray(pixels).save(buf, format="PNG")
    else:
        Image.fromarray(pixels).convert("CMYK").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def expected_tree(spec: MiniSpec) -> dict[str, bytes]:
    """'train/<wnid>/<file>' and 'val/<wnid>/<file>' -> file bytes: the ImageFolder tree every layout prepares to."""
    synth = SynthSpec(classes=min(spec.classes, MAX_CLASSES), size=spec.size, seed=spec.seed)
    odd = odd_files(spec)
    tree = {}
    for c, w in enumerate(wnids(spec)):
        for j in range(spec.train_per_class):
            rel = f"train/{w}/{train_name(w, j)}"
            tree[rel] = _encode(render_image(synth, 0, c % MAX_CLASSES, j), odd.get(rel))
    index = {w: i for i, w in enumerate(wnids(spec))}
    for k, w in enumerate(val_wnids(spec), start=1):
        tree[f"val/{w}/{inet.val_name(k)}"] = encode_jpeg(render_image(synth, 1, index[w] % MAX_CLASSES, k), 90)
    return tree


# ---------------------------------------------------------------------------------------------
# Archives, written byte-reproducibly.
# ---------------------------------------------------------------------------------------------


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed (ustar) tar of (name, bytes), in the order given, with fixed times and owners."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a fixed header (no name, mtime 0): same bytes, same md5."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="") as f:
        f.write(data)
    return buf.getvalue()


def meta_mat(spec: MiniSpec) -> bytes:
    """A devkit meta.mat: the struct array `synsets` with the real fields, leaves (IDs 1..N) then inner synsets."""
    import scipy.io

    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images")
    ids = ilsvrc_ids(spec)
    leaves = sorted(ids, key=ids.get)
    rows = [(ids[w], w, words(w), f"gloss of {w}", 0, np.zeros((0, 0)), 0, spec.train_per_class) for w in leaves]
    n = spec.classes
    rows += [(n + 1 + i, w, t, f"gloss of {w}", 1, np.array([n + 2 + i if i + 1 < len(_INNER) else 1], dtype=np.float64),
              len(_INNER) - i, 0) for i, (w, t) in enumerate(_INNER)]
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[r, 0][f] = np.array([[v]], dtype=np.float64) if isinstance(v, int) else v
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets}, format="5")
    return buf.getvalue()


def ground_truth(spec: MiniSpec) -> str:
    """ILSVRC2012_validation_ground_truth.txt: line k the ILSVRC2012_ID of validation image k."""
    ids = ilsvrc_ids(spec)
    return "".join(f"{ids[w]}\n" for w in val_wnids(spec))


def devkit_bytes(spec: MiniSpec) -> bytes:
    """ILSVRC2012_devkit_t12.tar.gz: meta.mat, the validation ground truth and a readme, under ILSVRC2012_devkit_t12/."""
    top = "ILSVRC2012_devkit_t12"
    return gzip_bytes(tar_bytes([(f"{top}/COPYING", b"miniature devkit for tests\n"),
                                 (f"{top}/readme.txt", b"ILSVRC2012 devkit (miniature)\n"),
                                 (f"{top}/{inet.META_MAT}", meta_mat(spec)),
                                 (f"{top}/{inet.GROUND_TRUTH}", ground_truth(spec).encode())]))


def _split(tree: dict[str, bytes], split: str) -> list[tuple[str, str, bytes]]:
    """(wnid, file name, bytes) of one split of the expected tree, in file-name order within each class."""
    rows = [(rel.split("/")[1], rel.split("/")[2], data) for rel, data in tree.items() if rel.startswith(split + "/")]
    return sorted(rows, key=lambda r: (r[0], r[1]))


def _val_sorted(tree: dict[str, bytes]) -> list[tuple[str, str, bytes]]:
    """Validation (wnid, name, bytes) in file-name order (ILSVRC2012_val_00000001 first)."""
    return sorted(_split(tree, "val"), key=lambda r: r[1])


def write_official(dest: Path, spec: MiniSpec, tree: dict[str, bytes]) -> None:
    """The three official archives: a tar of per-class tars, a flat validation tar, the devkit .tar.gz."""
    per_class: dict[str, list[tuple[str, bytes]]] = {}
    for w, name, data in _split(tree, "train"):
        per_class.setdefault(w, []).append((name, data))
    (dest / inet.TRAIN_TAR).write_bytes(tar_bytes([(f"{w}.tar", tar_bytes(files)) for w, files in per_class.items()]))
    (dest / inet.VAL_TAR).write_bytes(tar_bytes([(name, data) for _, name, data in _val_sorted(tree)]))
    (dest / inet.DEVKIT).write_bytes(devkit_bytes(spec))


def write_kaggle(dest: Path, spec: MiniSpec, tree: dict[str, bytes]) -> None:
    """Kaggle's tree: ILSVRC/Data/CLS-LOC/{train/<wnid>/, val/, test/}, LOC_val_solution.csv, LOC_synset_mapping.txt."""
    data = dest / inet.KAGGLE_DATA
    for w, name, blob in _split(tree, "train"):
        (data / "train" / w).mkdir(parents=True, exist_ok=True)
        (data / "train" / w / name).write_bytes(blob)
    (data / "val").mkdir(parents=True, exist_ok=True)
    (data / "test").mkdir(parents=True, exist_ok=True)  # unlabelled: prepare leaves it
    rows = ["ImageId,PredictionString"]
    for w, name, blob in _val_sorted(tree):
        (data / "val" / name).write_bytes(blob)
        rows.append(f"{name[:-5]},{w} 1 2 30 31 {w} 5 6 20 21 ")  # one '<wnid> box' per object, as Kaggle's has
    (data / "test" / "ILSVRC2012_test_00000001.JPEG").write_bytes(next(iter(tree.values())))
    (dest / inet.KAGGLE_VAL_CSV).write_text("\n".join(rows) + "\n")
    (dest / inet.KAGGLE_SYNSETS).write_text("".join(f"{w} {words(w)}\n" for w in wnids(spec)))
    (dest / "LOC_sample_submission.csv").write_text("ImageId,PredictionString\n")


def write_hf(dest: Path, spec: MiniSpec, tree: dict[str, bytes], train_shards: int = 2) -> None:
    """The Hugging Face tars in data/: train_images_<i>.tar.gz (classes spread over them), val_images.tar.gz."""
    folder = dest / "data"
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, bytes]]] = [[] for _ in range(train_shards)]
    for i, (w, name, blob) in enumerate(_split(tree, "train")):
        shards[i % train_shards].append((f"{name[:-5]}_{w}.JPEG", blob))
    for i, members in enumerate(shards):
        (folder / f"train_images_{i}.tar.gz").write_bytes(gzip_bytes(tar_bytes(members)))
    val = [(f"{name[:-5]}_{w}.JPEG", blob) for w, name, blob in _val_sorted(tree)]
    (folder / inet.HF_VAL).write_bytes(gzip_bytes(tar_bytes(val)))


def write_imagefolder(dest: Path, spec: MiniSpec, tree: dict[str, bytes]) -> None:
    """The ImageFolder tree itself (what prepare writes, less dataset.json)."""
    for rel, blob in tree.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(blob)


_WRITERS = {"official": write_official, "kaggle": write_kaggle, "hf": write_hf, "imagefolder": write_imagefolder}


def write_miniature(dest: str | Path, layout: str, spec: MiniSpec = MiniSpec()) -> dict[str, bytes]:
    """Write a miniature of `layout` (one of LAYOUTS) into dest; return expected_tree(spec), what it prepares to."""
    if layout not in _WRITERS:
        raise ValueError(f"unknown miniature layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tree = expected_tree(spec)
    _WRITERS[layout](dest, spec, tree)
    return tree

