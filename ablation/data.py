"""ImageNet-layout data: a fast layout check, the paper's transforms, and a seeded ImageFolder.

Augmentation randomness is a pure function of (seed, epoch, index), so a run gives the same
augmented images whatever the number of DataLoader workers, processes, or the resume point.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from ablation.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val")
_MASK64 = (1 << 64) - 1
# ImageNet's RGB PCA (fb.resnet.torch / AlexNet lighting noise).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)

Transform = Callable[[Image.Image], torch.Tensor]


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


def _is_image(name: str) -> bool:
    """True for the file names torchvision's ImageFolder loads (case-insensitive extension)."""
    return name.lower().endswith(IMG_EXTENSIONS)


def _class_dirs(split_dir: Path) -> list[str]:
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


def _require_dir(path: Path, what: str, fix: str) -> None:
    """Raise a one-line DataError unless path is an existing folder."""
    if not path.exists():
        raise DataError(f"{what} {path} does not exist; {fix}")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder; {fix}")


def _scan_split(root: Path, split: str, digest: Any) -> tuple[list[str], int]:
    """Class names and image count of one split; feeds relative file names into digest."""
    split_dir = root / split  # exists: check_splits ran first
    classes = _class_dirs(split_dir)
    if not classes:
        raise DataError(f"{split_dir} has no class folders; put each class's images in its own "
                        f"sub-folder, e.g. {split_dir}/<class>/<image>.JPEG")
    count = 0
    for name in classes:
        files = sorted(_image_files(str(split_dir / name), f"{split}/{name}/"))
        if not files:
            exts = ", ".join(IMG_EXTENSIONS)
            raise DataError(f"class folder {split_dir / name} has no image files ({exts}); "
                            f"add images or remove the folder")
        count += len(files)
        digest.update(("\n".join(files) + "\n").encode("utf-8", "surrogateescape"))
    return classes, count


def _few(names: list[str], limit: int = 3) -> str:
    """First few names, and how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_same_classes(root: Path, train: list[str], val: list[str]) -> None:
    """Raise DataError naming a few classes found in only one split."""
    if train == val:
        return
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    parts = []
    if only_train:
        parts.append(f"missing in val: {_few(only_train)}")
    if only_val:
        parts.append(f"missing in train: {_few(only_val)}")
    raise DataError(f"class folders differ between {root}/train and {root}/val ({'; '.join(parts)}); "
                    f"give both splits the same class folders")


def check_splits(root: str | Path) -> None:
    """Cheap check (no file walk) that root holds train/ and val/ folders: for a sweep before it submits."""
    root = Path(root).expanduser()
    _require_dir(root, "dataset folder", "point data.root at a folder holding train/ and val/ "
                 "in ImageNet (ImageFolder) layout")
    for split in SPLITS:
        _require_dir(root / split, f"{split} split folder", f"put one sub-folder per class under {root}/{split}")


def check_layout(root: str | Path) -> DatasetInfo:
    """Check root has train/ and val/ with the same non-empty class folders; return counts."""
    root = Path(root).expanduser()
    check_splits(root)
    digest = hashlib.sha256()
    scans = {}
    for split in SPLITS:
        digest.update(f"[{split}]\n".encode())
        scans[split] = _scan_split(root, split, digest)
    (train, n_train), (val, n_val) = scans["train"], scans["val"]
    _check_same_classes(root, train, val)
    digest.update(("[classes]\n" + "\n".join(train) + "\n").encode("utf-8", "surrogateescape"))
    return DatasetInfo(root=str(root), classes=tuple(train), train_images=n_train,
                       val_images=n_val, fingerprint=digest.hexdigest()[:16])


# ---------------------------------------------------------------------------------------------
# Transforms.
# ---------------------------------------------------------------------------------------------


class Lighting:
    """AlexNet-style PCA lighting noise on a [0,1] CHW tensor; alpha from torch's global RNG."""

    def __init__(self, alphastd: float, eigval: tuple[float, ...] = IMAGENET_EIGVAL,
                 eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC) -> None:
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Add one RGB offset, eigvec @ (alpha * eigval), to every pixel."""
        if self.alphastd == 0:
            return img  # no RNG draw either, so turning lighting off leaves other draws unchanged
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.to(img.dtype).view(3, 1, 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def _to_float() -> list[Any]:
    """PIL image -> float32 tensor in [0,1]."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]


def train_transform(cfg: Any) -> Transform:
    """fb.resnet.torch order: crop, colour jitter, lighting, normalize, flip."""
    steps: list[Any] = [v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.crop_scale),
                                             ratio=tuple(cfg.crop_ratio), antialias=True)]
    steps += _to_float()
    if cfg.color_jitter > 0:
        cj = cfg.color_jitter
        steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    if cfg.lighting > 0:
        steps.append(Lighting(cfg.lighting))
    steps.append(v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)))
    if cfg.hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToPureTensor())  # plain Tensor, so batches carry no tv_tensors subclass
    return v2.Compose(steps)


def eval_transform(cfg: Any) -> Transform:
    """Resize the shorter side, centre crop, normalize."""
    return v2.Compose([
        v2.Resize(cfg.eval_resize, antialias=True),
        v2.CenterCrop(cfg.image_size),
        *_to_float(),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        v2.ToPureTensor(),
    ])


# ---------------------------------------------------------------------------------------------
# Dataset.
# ---------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    """One SplitMix64 step: a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """64-bit seed for one sample's augmentation, mixed from (seed, epoch, index)."""
    h = 0
    for value in (seed, epoch, index):
        h = _splitmix64(h ^ (value & _MASK64))
    return h


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB, or raise a one-line DataError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}; replace or delete the file") from exc


class SeededImageFolder(torch.utils.data.Dataset):
    """ImageFolder whose augmentation depends only on (seed, epoch, index)."""

    def __init__(self, root: str | Path, split: str, transform: Transform | None, seed: int) -> None:
        split_dir = Path(root).expanduser() / split
        _require_dir(split_dir, f"{split} split folder",
                     f"put one sub-folder per class under it (run check_layout on {root})")
        try:
            self.classes, self.class_to_idx = find_classes(split_dir)
            self.samples: list[tuple[str, int]] = make_dataset(
                split_dir, self.class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, ValueError) as exc:
            reason = " ".join(str(exc).split())
            raise DataError(f"bad class folders in {split_dir}: {reason}; "
                            f"every class folder needs at least one image") from exc
        self.root = str(split_dir)
        self.split = split
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.targets = [target for _, target in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's augmentation; call before creating the epoch's DataLoader iterator."""
        # Workers copy the dataset when an iterator starts, so with persistent_workers=True a later
        # set_epoch never reaches them: use non-persistent workers with this dataset.
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Load, then transform under a private RNG seeded from (seed, epoch, index)."""
        index = int(index)
        if index < 0:
            index += len(self.samples)  # same sample, same augmentation, whichever way it is indexed
        path, target = self.samples[index]
        img = load_rgb(path)
        if self.transform is None:
            return v2.functional.pil_to_tensor(img).to(torch.float32).div_(255.0), target
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA's global RNG, which
            # fork_rng(devices=[]) does not restore, and the training loop's GPU draws would shift.
            torch.random.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            out = self.transform(img)
        return out, target
