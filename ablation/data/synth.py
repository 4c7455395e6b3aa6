"""Deterministic synthetic ImageNet-layout dataset: shapes and textures drawn with numpy, saved as JPEG.

The class of an image is its shape or texture only; colours, position, size, rotation and noise are
nuisances drawn per image. Every image comes from its own generator seeded by
(seed, split, class, index), so the same spec gives byte-identical files in any order or process.
This module imports numpy and pillow only (no torch), so it can run anywhere the data is prepared.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ablation.errors import DataError

FORMAT_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "val")
SUPERSAMPLE = 2  # draw at 2x and box-average down: cheap anti-aliasing of the shape edges
_COLOUR_BATCH = 256
_COLOUR_TRIES = 64  # 16k candidate pairs: enough for the largest allowed distance (1.2, p ~ 1.3 %)
_MAX_COLOUR_DISTANCE = 1.2
_POOL_MIN_PIXELS = 2_000_000  # below this a worker pool costs more to start than it saves

MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines a synthetic dataset; two equal specs give byte-identical files."""

    classes: int = 10
    train_per_class: int = 64
    val_per_class: int = 16
    size: int = 64
    seed: int = 0
    min_colour_distance: float = 0.35  # fg/bg RGB distance (Euclidean in [0,1]^3) at least this
    position: float = 0.35  # centre jitter, fraction of half-width
    scale: tuple[float, float] = (0.35, 0.65)  # shape size, fraction of half-width
    rotation: float = 15.0  # degrees, uniform in +-rotation
    noise: float = 0.05  # gaussian pixel noise sigma (pixel range [0,1])
    brightness: float = 0.0  # per-image brightness nuisance: multiply image by U(1-b, 1+b)
    contrast: float = 0.0  # per-image contrast nuisance: (x-mean)*U(1-c,1+c)+mean
    quality: int = 95  # JPEG quality


# ---------------------------------------------------------------------------------------------
# Shapes. Each mask function takes local coordinates (x right, y down) in units of the shape's
# half-size, already centred, rotated and scaled, and returns a boolean mask. Textures fill the
# square patch |x|,|y| <= 1 so that they move and scale like the shapes.
# ---------------------------------------------------------------------------------------------

_SQRT2 = math.sqrt(2.0)


def _patch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Square patch that textures are clipped to."""
    return np.maximum(np.abs(x), np.abs(y)) <= 1.0


def _bands(t: np.ndarray, width: float) -> np.ndarray:
    """Alternating bands of the given width along t, with a foreground band centred on t = 0."""
    return np.floor((t + width / 2) / width) % 2 == 0


def _lines(t: np.ndarray, period: float, width: float) -> np.ndarray:
    """Thin lines of the given width every `period` along t, one through t = 0."""
    return (t + width / 2) % period < width


def _plus(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Plus sign with arms 0.6 wide."""
    ax, ay = np.abs(x), np.abs(y)
    return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))


def _triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Equilateral triangle pointing up with circumradius 1."""
    up = -y  # image rows grow downwards
    inside = up >= -0.5
    for angle in (math.radians(30.0), math.radians(150.0)):
        inside &= x * math.cos(angle) + up * math.sin(angle) <= 0.5
    return inside


def _dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """3x3 grid of dots."""
    gx = np.clip(np.round(x / 0.7), -1, 1) * 0.7
    gy = np.clip(np.round(y / 0.7), -1, 1) * 0.7
    return (x - gx) ** 2 + (y - gy) ** 2 <= 0.25**2


SHAPES: tuple[tuple[str, MaskFn], ...] = (
    ("disk", lambda x, y: x * x + y * y <= 1.0),
    ("ring", lambda x, y: (x * x + y * y <= 1.0) & (x * x + y * y >= 0.55**2)),
    ("square", lambda x, y: np.maximum(np.abs(x), np.abs(y)) <= 0.85),
    ("square_outline", lambda x, y: (np.maximum(np.abs(x), np.abs(y)) <= 0.85)
     & (np.maximum(np.abs(x), np.abs(y)) >= 0.45)),
    ("triangle", _triangle),
    ("plus", _plus),
    ("x", lambda x, y: _plus((x + y) / _SQRT2, (x - y) / _SQRT2)),
    ("hstripes", lambda x, y: _patch(x, y) & _bands(y, 0.4)),
    ("vstripes", lambda x, y: _patch(x, y) & _bands(x, 0.4)),
    ("checkerboard", lambda x, y: _patch(x, y) & (_bands(x, 0.5) == _bands(y, 0.5))),
    ("diamond", lambda x, y: np.abs(x) + np.abs(y) <= 1.0),
    ("ellipse", lambda x, y: x * x + (y / 0.5) ** 2 <= 1.0),
    ("dstripes", lambda x, y: _patch(x, y) & _bands((x + y) / _SQRT2, 0.35)),
    ("half_disk", lambda x, y: (x * x + (y - 0.4) ** 2 <= 1.0) & (y <= 0.4)),
    ("dots", _dots),
    ("crosshatch", lambda x, y: _patch(x, y) & (_lines((x + y) / _SQRT2, 0.6, 0.22)
                                                | _lines((x - y) / _SQRT2, 0.6, 0.22))),
    ("grid", lambda x, y: _patch(x, y) & (_lines(x, 0.6, 0.22) | _lines(y, 0.6, 0.22))),
    ("crescent", lambda x, y: (x * x + y * y <= 1.0) & ((x - 0.45) ** 2 + y * y > 0.75**2)),
)
MAX_CLASSES = len(SHAPES)


def class_names(classes: int) -> list[str]:
    """Folder names `NN_shape` of the first `classes` shapes."""
    return [class_name(i) for i in range(classes)]


def class_name(class_id: int) -> str:
    """Folder name `NN_shape` of one class, e.g. `01_ring`."""
    return f"{class_id:02d}_{SHAPES[class_id][0]}"


# ---------------------------------------------------------------------------------------------
# Spec validation and serialisation.
# ---------------------------------------------------------------------------------------------


def _check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise DataError unless low <= value <= high."""
    if not (low <= value <= high):
        raise DataError(f"SynthSpec field `{name}` = {value!r} is out of range; "
                        f"use a value in [{low}, {high}]")


def validate_spec(spec: SynthSpec) -> None:
    """Raise DataError naming the first field of `spec` that cannot be generated."""
    if not (2 <= spec.classes <= MAX_CLASSES):
        raise DataError(f"SynthSpec field `classes` = {spec.classes!r} is out of range; "
                        f"use 2 to {MAX_CLASSES} (the number of shapes the generator can draw)")
    _check_range("train_per_class", spec.train_per_class, 1, 99_999)
    _check_range("val_per_class", spec.val_per_class, 1, 99_999)
    _check_range("size", spec.size, 8, 4096)
    _check_range("seed", spec.seed, 0, 2**63 - 1)
    _check_range("min_colour_distance", spec.min_colour_distance, 0.0, _MAX_COLOUR_DISTANCE)
    _check_range("position", spec.position, 0.0, 1.0)
    _check_range("rotation", spec.rotation, 0.0, 180.0)
    _check_range("noise", spec.noise, 0.0, 1.0)
    _check_range("brightness", spec.brightness, 0.0, 1.0)
    _check_range("contrast", spec.contrast, 0.0, 1.0)
    _check_range("quality", spec.quality, 1, 100)
    if len(spec.scale) != 2 or not (0.0 < spec.scale[0] <= spec.scale[1] <= 2.0):
        raise DataError(f"SynthSpec field `scale` = {spec.scale!r} is invalid; "
                        f"use (low, high) with 0 < low <= high <= 2")


def spec_to_json(spec: SynthSpec) -> dict[str, Any]:
    """JSON-ready dict of the spec (tuples become lists)."""
    return json.loads(json.dumps(asdict(spec)))


# ---------------------------------------------------------------------------------------------
# Rendering.
# ---------------------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates in [-1, 1] (u right, v down)."""
    n = size * SUPERSAMPLE
    t = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    return np.meshgrid(t, t, indexing="xy")


def draw_colours(rng: np.random.Generator, min_distance: float) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB in [0,1] at least `min_distance` apart (rejection sampling)."""
    for _ in range(_COLOUR_TRIES):
        pairs = rng.random((_COLOUR_BATCH, 2, 3))
        ok = np.flatnonzero(np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=1) >= min_distance)
        if ok.size:
            return pairs[ok[0], 0], pairs[ok[0], 1]
    raise DataError(f"SynthSpec field `min_colour_distance` = {min_distance} is too large to sample; "
                    f"use at most {_MAX_COLOUR_DISTANCE}")


def shape_coverage(spec: SynthSpec, class_id: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0,1] (size x size) of class `class_id` at a random pose."""
    cx, cy = rng.uniform(-spec.position, spec.position, size=2)
    scale = rng.uniform(spec.scale[0], spec.scale[1])
    theta = math.radians(rng.uniform(-spec.rotation, spec.rotation))
    u, v = _grid(spec.size)
    du, dv = u - cx, v - cy
    cos, sin = math.cos(theta), math.sin(theta)
    x = (cos * du + sin * dv) / scale
    y = (-sin * du + cos * dv) / scale
    mask = SHAPES[class_id][1](x, y).astype(np.float64)
    s = spec.size
    return mask.reshape(s, SUPERSAMPLE, s, SUPERSAMPLE).mean(axis=(1, 3))


def render_image(spec: SynthSpec, split_id: int, class_id: int, index: int) -> np.ndarray:
    """The (size, size, 3) uint8 image number `index` of a class and split; pure function of its args."""
    rng = np.random.default_rng([spec.seed, split_id, class_id, index])
    # Fixed draw order (pose, photometric factors, colours, noise) keeps the stream reproducible.
    coverage = shape_coverage(spec, class_id, rng)
    bright = rng.uniform(1.0 - spec.brightness, 1.0 + spec.brightness)
    contrast = rng.uniform(1.0 - spec.contrast, 1.0 + spec.contrast)
    fg, bg = draw_colours(rng, spec.min_colour_distance)
    img = bg + (fg - bg) * coverage[..., None]
    img = img * bright
    mean = img.mean()
    img = (img - mean) * contrast + mean
    if spec.noise > 0:
        img = img + rng.normal(0.0, spec.noise, size=img.shape)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB uint8 array; 4:4:4 so tiny images keep sharp colour edges."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _write_class(args: tuple[SynthSpec, str, int, int, int]) -> int:
    """Render and save every image of one (split, class); returns the number written."""
    spec, split_dir, split_id, class_id, count = args
    name = class_name(class_id)
    folder = Path(split_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        data = encode_jpeg(render_image(spec, split_id, class_id, i), spec.quality)
        (folder / f"{name}_{i:05d}.JPEG").write_bytes(data)
    return count


# ---------------------------------------------------------------------------------------------
# Writing with cache check and atomic rename.
# ---------------------------------------------------------------------------------------------


def _read_marker(root: Path) -> dict[str, Any]:
    """Parsed root/synth.json, or DataError if it is unreadable."""
    marker = root / "synth.json"
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {marker}: {exc}; delete the folder {root} to regenerate it") from exc


def _matches(marker: dict[str, Any], spec: SynthSpec) -> bool:
    """True when a synth.json marker describes exactly this spec and format."""
    return marker.get("format_version") == FORMAT_VERSION and marker.get("spec") == spec_to_json(spec)


def _check_existing(root: Path, spec: SynthSpec) -> bool:
    """True if root already holds this dataset; DataError if it holds anything else; False if free."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pick another folder for the synthetic dataset")
    if (root / "synth.json").exists():
        if _matches(_read_marker(root), spec):
            return True
        raise DataError(f"{root} holds a different synthetic dataset (synth.json differs from the "
                        f"requested spec); pick another folder or delete {root}")
    if any(os.scandir(root)):
        raise DataError(f"{root} is not empty and has no synth.json, so it is not a synthetic dataset; "
                        f"pick an empty or new folder (existing data is never overwritten)")
    return False


def _jobs(spec: SynthSpec, tmp: Path) -> list[tuple[SynthSpec, str, int, int, int]]:
    """One job per (split, class)."""
    counts = {"train": spec.train_per_class, "val": spec.val_per_class}
    return [(spec, str(tmp / split), split_id, class_id, counts[split])
            for split_id, split in enumerate(SPLITS) for class_id in range(spec.classes)]


def _run_jobs(jobs: list[tuple[SynthSpec, str, int, int, int]], total_pixels: int, progress: bool) -> None:
    """Run the jobs, in a process pool when the dataset is big enough to pay for one."""
    total = sum(job[4] for job in jobs)
    workers = min(os.cpu_count() or 1, len(jobs))
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        if progress and sys.stderr.isatty():
            end = "\n" if done == total else ""
            print(f"\rsynth: {done}/{total} images", end=end, file=sys.stderr, flush=True)
        elif progress and done == total:  # a log file gets one line, not a carriage-return smear
            print(f"synth: {total} images", file=sys.stderr, flush=True)

    if workers > 1 and total_pixels >= _POOL_MIN_PIXELS and sys.platform.startswith("linux"):
        # fork, not spawn: spawn re-imports the caller's __main__, which breaks scripts without a
        # main guard and stdin/-c callers; children only run numpy and pillow, never torch.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for n in pool.imap_unordered(_write_class, jobs):
                report(n)
    else:
        for job in jobs:
            report(_write_class(job))


def write_synth(root: str | Path, spec: SynthSpec, *, progress: bool = False) -> bool:
    """Write the dataset for `spec` at `root`; False if it is already there, True when written."""
    validate_spec(spec)
    root = Path(root)
    if _check_existing(root, spec):
        return False
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f"{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only this pid uses this name: a leftover is ours
    try:
        tmp.mkdir()
        jobs = _jobs(spec, tmp)
        total = spec.classes * (spec.train_per_class + spec.val_per_class)
        _run_jobs(jobs, total * spec.size * spec.size, progress)
        marker = {"format_version": FORMAT_VERSION, "spec": spec_to_json(spec),
                  "classes": class_names(spec.classes)}
        # The marker is written last, so a folder with synth.json is always complete.
        (tmp / "synth.json").write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        return _publish(tmp, root, spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, root: Path, spec: SynthSpec) -> bool:
    """Rename tmp to root; if another writer got there first with the same spec, keep theirs."""
    try:
        if root.is_dir() and not any(os.scandir(root)):
            root.rmdir()  # an empty folder the user made is fine to replace
        os.replace(tmp, root)
        return True
    except OSError as exc:
        if (root / "synth.json").exists() and _matches(_read_marker(root), spec):
            return False  # a concurrent writer finished first with identical content
        raise DataError(f"cannot move the generated dataset into {root}: {exc}; "
                        f"check the folder is writable and empty") from exc
