"""The pipelines that feed a run from the dataset: the paper's transforms, the split and device-decode pipelines, the seeded dataset.

Augmentation randomness is a pure function of (seed, epoch, index), so a run gives the same
augmented images whatever the number of DataLoader workers, processes, or the resume point.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from ablation.data.archives import archive_kind
from ablation.data.layout import READ_ERRORS, DatasetScan, load_rgb, require_dir, scan_layout, unreadable_error
from ablation.data.members import Source, read_source
from ablation.errors import DataError

try:  # libjpeg-turbo straight into a tensor: ~13% more split-pipeline images/s than PIL's route (A/B, 448-px synth JPEGs).
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except ImportError:  # deprecated since torchvision 0.29 in favour of TorchCodec: PIL takes over when it goes
    _tv_decode_jpeg = None

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
# Transforms.
# ---------------------------------------------------------------------------------------------


class Lighting:
    """AlexNet-style PCA lighting noise on a [0,1] CHW tensor; alpha from torch's global RNG."""

    def __init__(self, alphastd: float, eigval: tuple[float, ...] = IMAGENET_EIGVAL,
                 eigvec: tuple[tuple[float, ...], ...] = IMAGENET_EIGVEC) -> None:
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float32)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float32)

    def draw(self) -> torch.Tensor:
        """The random coefficients alpha (3,), from torch's global RNG; the split pipeline ships them."""
        return torch.randn(3) * self.alphastd

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Add one RGB offset, eigvec @ (alpha * eigval), to every pixel."""
        if self.alphastd == 0:
            return img  # no RNG draw either, so turning lighting off leaves other draws unchanged
        rgb = self.eigvec @ (self.draw() * self.eigval)
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
# The split pipeline: parameters and pixels on the loader, photometric steps batched on the device.
# ---------------------------------------------------------------------------------------------
#
# train_transform does all of the augmentation per image, in float, on a loader worker. The split
# pipeline (data.pipeline=split) draws the same random parameters from the same per-image
# generator in the same order -- it calls make_params of the very transform objects train_transform
# builds -- so crop box, jitter factors and order, lighting alpha and flip are identical. The worker
# then only decodes, crops and resizes to uint8, decoding the JPEG at 1/2, 1/4 or 1/8 scale when the
# crop is at least that many times larger than the output (libjpeg's DCT scaling, PIL's draft mode),
# and ships the pixels with their parameters; `finish_on_device` applies jitter, lighting, normalize
# and flip to the whole batch on the training device. Where no reduced-scale decode happens the uint8
# crop is the reference path's exactly, and the float results differ by rounding only (~1e-6); where
# it happens they differ as two resampling routes do (tests/test_data.py measures both).


class DecodedCache:
    """Decoded images kept in memory up to a byte budget, first come first kept (never evicted).

    For small datasets (the demo's 10,000 images of 32 px take 30 MB): each image is read and decoded once
    per start instead of once per epoch. Decoding is deterministic, so cached pixels are the decoded ones.
    It lives in the process that loads: with loader workers (started afresh each epoch) it would be lost.
    """

    def __init__(self, limit_bytes: int) -> None:
        self.limit, self.used = int(limit_bytes), 0
        self.items: dict[str, Any] = {}
        self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        """The cached value, or None."""
        value = self.items.get(key)
        self.hits += value is not None
        self.misses += value is None
        return value

    def put(self, key: str, value: Any, nbytes: int) -> None:
        """Keep value while the budget lasts."""
        if self.used + nbytes <= self.limit:
            self.items[key] = value
            self.used += nbytes


class SplitSample(NamedTuple):
    """A training image of the split pipeline (batched by the DataLoader's collate into the same type)."""

    pixels: torch.Tensor  # uint8 (H, W, 3): cropped and resized, no photometric step yet
    jitter: torch.Tensor  # float64 (3,): brightness, contrast, saturation factors (1 = unchanged)
    order: torch.Tensor  # int64 (4,): ColorJitter's order of brightness 0, contrast 1, saturation 2, hue 3 (unused)
    alpha: torch.Tensor  # float32 (3,): PCA lighting coefficients (0 = none)
    flip: torch.Tensor  # bool (): horizontal flip


@dataclass(frozen=True)
class AugParams:
    """One image's random augmentation parameters, as train_transform draws them."""

    box: tuple[int, int, int, int]  # crop (left, top, right, bottom) in full-size pixels
    jitter: tuple[float, float, float] | None  # brightness, contrast, saturation factors
    order: tuple[int, int, int, int] | None  # ColorJitter's permutation
    alpha: torch.Tensor | None  # lighting coefficients (3,)
    flip: bool


def draft_scale(crop_w: int, crop_h: int, out_w: int, out_h: int) -> int:
    """The JPEG decode scale denominator for a crop shrunk to (out_w, out_h): the largest s in 8, 4, 2
    at which the crop still covers the output on both sides, else 1.

    The crop is then shrunk from the 1/s-scale pixels instead of the full-size ones, never enlarged:
    a crop smaller than twice the output on either side decodes at full size.
    """
    for s in (8, 4, 2):
        if crop_w >= s * out_w and crop_h >= s * out_h:
            return s
    return 1


def read_crop(img: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int],
              data: bytes | None = None) -> tuple[torch.Tensor, int]:
    """Decode an opened image (header read, pixels not yet), crop `box` (left, top, right, bottom) and
    resize it to `size` (h, w). Returns uint8 pixels (h, w, 3) and the JPEG scale denominator used.

    Reduced scale: PIL's draft mode, then PIL's bilinear resize from the fractional box. Full size:
    torchvision's libjpeg-turbo decoder when `data` (the file's bytes) holds an RGB JPEG -- PIL's pixels
    exactly, without PIL's copy into an array (PIL when torchvision lacks it) -- else PIL; then torch's antialiased bilinear resize on
    uint8, PIL's filter within one level at a fifth of PIL's time.
    """
    left, top, right, bottom = box
    out_h, out_w = size
    scale = draft_scale(right - left, bottom - top, out_w, out_h)
    if scale > 1:
        full_w = img.width
        drafted = img.draft("RGB", (img.width // scale, img.height // scale))  # None: not a JPEG
        scale = 1 if drafted is None else round(full_w / drafted[1][2])
    if scale > 1:  # box in the reduced image's coordinates: a pixel there covers scale x scale full-size pixels
        img.load()
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        out = rgb.resize((out_w, out_h), Image.BILINEAR, box=tuple(v / scale for v in box))
        return torch.from_numpy(np.array(out)), scale
    return resize_uint8(_decode_crop(img, data, box), out_h, out_w), 1


def _decode_crop(img: Image.Image, data: bytes | None, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The full-size pixels (h, w, 3) uint8 of `box` (left, top, right, bottom) of an opened image."""
    left, top, right, bottom = box
    if _tv_decode_jpeg is not None and data is not None and img.format == "JPEG" and img.mode == "RGB":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # once per call, in every worker
                raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                full = _tv_decode_jpeg(raw, mode=ImageReadMode.RGB).permute(1, 2, 0)  # its memory is (H, W, 3)
                return full[top:bottom, left:right]
        except RuntimeError:
            pass  # damaged: PIL decodes it again and says what is wrong
    img.load()
    return torch.from_numpy(np.array((img if img.mode == "RGB" else img.convert("RGB")).crop(box)))


def resize_uint8(hwc: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (H, W, 3) pixels, as PIL's BILINEAR does it."""
    x = hwc.contiguous().permute(2, 0, 1)  # channels-last (3, H, W): torch's vectorised uint8 path
    if tuple(x.shape[1:]) != (out_h, out_w):
        x = v2.functional.resize(x, [out_h, out_w], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    return x.permute(1, 2, 0).contiguous()


class SplitTrainTransform:
    """The loader half of the split pipeline: train_transform's random parameters, then decode + crop + resize."""

    reads_files = True  # SeededImageFolder hands over the path: this reads, and decodes what the crop needs
    caches = True  # SeededImageFolder may hand over a DecodedCache

    def __init__(self, cfg: Any) -> None:
        steps = train_transform(cfg).transforms  # the reference's own objects: same settings, same draws

        def step(kind: type) -> Any:
            return next((t for t in steps if isinstance(t, kind)), None)

        self.crop, self.jitter = step(v2.RandomResizedCrop), step(v2.ColorJitter)
        self.lighting, self.flip = step(Lighting), step(v2.RandomHorizontalFlip)
        self.size = tuple(self.crop.size)  # (h, w)
        self.images = self.reduced = 0  # how many images, and how many decoded at reduced scale (data bench)

    def params(self, width: int, height: int) -> AugParams:
        """Draw from torch's global RNG what train_transform draws for an image of this size, in its order."""
        box = self._crop_box(width, height)
        jitter = order = alpha = None
        if self.jitter is not None:
            j = self.jitter.make_params([])
            jitter = (j["brightness_factor"], j["contrast_factor"], j["saturation_factor"])
            order = tuple(j["fn_idx"].tolist())
        if self.lighting is not None:
            alpha = self.lighting.draw()
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)  # v2 flips unless rand >= p
        return AugParams(box, jitter, order, alpha, flip)

    def _crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop.make_params's draws, in its order, and its box (left, top, right, bottom).

        The same few RNG calls as torchvision 0.2x's, without its per-call size query on a tensor of the image's
        shape (~70 us per image, a tenth of a small model's step per image on a CPU core);
        tests/test_data.py holds it to torchvision's own make_params.
        """
        scale, ratio, area = self.crop.scale, self.crop.ratio, height * width
        log_lo, log_hi = (float(v) for v in self.crop._log_ratio)
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
            aspect_ratio = torch.empty(1).uniform_(log_lo, log_hi).exp_().item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return left, top, left + w, top + h
        in_ratio = width / height  # ten misses: the central crop, clamped to the ratio range
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            w, h = int(round(height * max(ratio))), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return left, top, left + w, top + h

    def __call__(self, path: Source, cache: DecodedCache | None = None) -> SplitSample:
        p = None
        full = cache.get(path) if cache is not None else None
        if full is not None:  # the whole image, decoded at full size on an earlier epoch
            p = self.params(full.shape[1], full.shape[0])
            if self._full_size(p):
                return self._sample(p, self._crop(full, p), 1)
        data = read_source(path)  # a file's bytes, or an archive member's
        with Image.open(io.BytesIO(data)) as img:
            p = p or self.params(*img.size)  # from the header: nothing decoded yet
            if cache is not None and full is None and self._full_size(p):
                full = _decode_crop(img, data, (0, 0, img.width, img.height))
                cache.put(path, full, full.numel())
                return self._sample(p, self._crop(full, p), 1)
            pixels, scale = read_crop(img, p.box, self.size, data)
        return self._sample(p, pixels, scale)

    def _full_size(self, p: AugParams) -> bool:
        """True when read_crop decodes this crop at full size (no reduced-scale JPEG decode)."""
        left, top, right, bottom = p.box
        return draft_scale(right - left, bottom - top, self.size[1], self.size[0]) == 1

    def _crop(self, full: torch.Tensor, p: AugParams) -> torch.Tensor:
        """read_crop's full-size route from already decoded pixels: the same crop, the same resize."""
        left, top, right, bottom = p.box
        return resize_uint8(full[top:bottom, left:right], *self.size)

    def _sample(self, p: AugParams, pixels: torch.Tensor, scale: int) -> SplitSample:
        """The loader's output for one image."""
        self.images += 1
        self.reduced += scale > 1
        return SplitSample(
            pixels,
            torch.tensor(p.jitter or (1.0, 1.0, 1.0), dtype=torch.float64),
            torch.tensor(p.order or (0, 1, 2, 3), dtype=torch.int64),
            p.alpha if p.alpha is not None else torch.zeros(3),
            torch.tensor(p.flip),
        )


class EncodedSample(NamedTuple):
    """A training image of the device-decode pipeline: the JPEG file's bytes and its parameters.

    Batched by ``collate`` (``encoded`` and ``pixels`` stay lists: their sizes differ per image).
    """

    encoded: torch.Tensor  # uint8 (bytes,): the JPEG file; empty where `pixels` holds the loader's crop
    pixels: torch.Tensor  # uint8 (H, W, 3): a file the device decoder cannot take (not a baseline RGB JPEG); else empty
    box: torch.Tensor  # int64 (4,): crop (left, top, right, bottom) in full-size pixels
    jitter: torch.Tensor
    order: torch.Tensor
    alpha: torch.Tensor
    flip: torch.Tensor


class DeviceDecodeTrainTransform(SplitTrainTransform):
    """The loader half of the device-decode pipeline: read the file, draw its parameters, ship the bytes.

    The same parameters as the split pipeline (the same make_params draws from the header's size); the
    JPEG is decoded, cropped and resized on the training device by ``decode_on_device`` -- batched
    nvJPEG through torchvision.io.decode_jpeg on a GPU -- so a loader core only reads files. Files
    that are not RGB JPEGs (PNG, grayscale or CMYK JPEGs: a few dozen in ImageNet) are decoded,
    cropped and resized here, as the split pipeline does.
    """

    caches = False  # the bytes go to the device decoder

    def __call__(self, path: Source) -> EncodedSample:  # type: ignore[override]
        data = read_source(path)  # a file's bytes, or an archive member's
        empty = torch.empty(0, dtype=torch.uint8)
        with Image.open(io.BytesIO(data)) as img:
            p = self.params(*img.size)  # from the header: nothing decoded here
            if _tv_decode_jpeg is not None and img.format == "JPEG" and img.mode == "RGB":
                encoded, pixels = torch.frombuffer(bytearray(data), dtype=torch.uint8), empty
            else:
                encoded, pixels = empty, read_crop(img, p.box, self.size, data)[0]
        self.images += 1
        return EncodedSample(
            encoded,
            pixels,
            torch.tensor(p.box, dtype=torch.int64),
            torch.tensor(p.jitter or (1.0, 1.0, 1.0), dtype=torch.float64),
            torch.tensor(p.order or (0, 1, 2, 3), dtype=torch.int64),
            p.alpha if p.alpha is not None else torch.zeros(3),
            torch.tensor(p.flip),
        )


def collate(batch: list[Any]) -> Any:
    """torch's default_collate, but a device-decode batch keeps its variable-size bytes and pixels as lists."""
    first = batch[0][0] if batch and isinstance(batch[0], tuple) and len(batch[0]) == 2 else None
    if not isinstance(first, EncodedSample):
        return torch.utils.data.default_collate(batch)
    samples = [x for x, _ in batch]
    fixed = torch.utils.data.default_collate([tuple(s[2:]) for s in samples])
    x = EncodedSample([s.encoded for s in samples], [s.pixels for s in samples], *fixed)
    return x, torch.tensor([y for _, y in batch], dtype=torch.int64)


def decode_on_device(x: EncodedSample, size: tuple[int, int], device: str | torch.device) -> torch.Tensor:
    """A device-decode batch's uint8 (N, H, W, 3) crops on `device`: decode, crop, resize, as read_crop does at full size.

    On a GPU torchvision decodes the whole batch's JPEGs in one nvJPEG call; on the CPU it is the split
    pipeline's libjpeg-turbo decode and resize, so the pixels are the split pipeline's exactly (at full
    scale). nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two.
    """
    if _tv_decode_jpeg is None:
        raise DataError("data.pipeline=device-decode needs torchvision.io.decode_jpeg, "
                        "which this torchvision lacks; use data.pipeline=split")
    out_h, out_w = size
    out = torch.empty((len(x.encoded), out_h, out_w, 3), dtype=torch.uint8, device=device)
    rows = [i for i, e in enumerate(x.encoded) if e.numel()]
    if rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = _tv_decode_jpeg([x.encoded[i] for i in rows], mode=ImageReadMode.RGB, device=device)
        for i, chw, box in zip(rows, decoded, x.box[rows].tolist()):
            left, top, right, bottom = box
            crop = chw[:, top:bottom, left:right]
            if tuple(crop.shape[1:]) != (out_h, out_w):
                crop = v2.functional.resize(crop, [out_h, out_w], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
            out[i] = crop.permute(1, 2, 0)
    for i, pixels in enumerate(x.pixels):
        if pixels.numel():
            out[i] = pixels.to(device, non_blocking=True)
    return out


class SplitEvalTransform:
    """eval_transform's resize and centre crop on the loader, to uint8 (H, W, 3); normalize runs on the device.

    No reduced-scale decoding here: evaluation sees exactly the reference path's pixels, whatever the pipeline.
    """

    def __init__(self, cfg: Any) -> None:
        self.steps = v2.Compose([v2.Resize(cfg.eval_resize, antialias=True), v2.CenterCrop(cfg.image_size)])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(self.steps(img)))


def pipeline_transforms(cfg: Any) -> tuple[Transform, Transform]:
    """(train, eval) transforms of cfg.pipeline; cfg is a DataConfig with eval_resize filled in."""
    pipeline = getattr(cfg, "pipeline", "reference")
    if pipeline == "split":
        return SplitTrainTransform(cfg), SplitEvalTransform(cfg)
    if pipeline == "device-decode":  # evaluation as the split pipeline's: the reference's pixels exactly
        return DeviceDecodeTrainTransform(cfg), SplitEvalTransform(cfg)
    return train_transform(cfg), eval_transform(cfg)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """torchvision's float grayscale (N, 1, H, W) of an RGB batch."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _brightness(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return x.mul_(f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)
    return x.mul_(f).add_(mean * g).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    gray = _gray(x)
    return x.mul_(f).add_(gray * g).clamp_(0, 1)


_JITTER_OPS = (_brightness, _contrast, _saturation)  # ColorJitter's fn_idx 0, 1, 2 (3, hue, is off)


def _color_jitter(x: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter with per-image factors and order: x * f + other * (1 - f), clamped.

    Images are grouped by their order of the three operations (at most 6 groups), so every image
    goes through each operation once; jitter and order stay on the CPU, where the grouping is free.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, perm in enumerate(order.tolist()):
        groups.setdefault(tuple(k for k in perm if k != 3), []).append(row)
    # f as the kernels see it (float32), 1 - f computed in float64 as torchvision's Python float is
    f = jitter.to(torch.float32).to(x.device, non_blocking=True)
    g = (1.0 - jitter).to(torch.float32).to(x.device, non_blocking=True)
    for ops, rows in groups.items():
        whole = len(rows) == len(x)
        idx = None if whole else torch.tensor(rows).to(x.device, non_blocking=True)
        sub = x if idx is None else x.index_select(0, idx)
        fs, gs = (f, g) if idx is None else (f.index_select(0, idx), g.index_select(0, idx))
        for op in ops:
            sub = _JITTER_OPS[op](sub, fs[:, op].view(-1, 1, 1, 1), gs[:, op].view(-1, 1, 1, 1))
        if idx is not None:
            x.index_copy_(0, idx, sub)
    return x


def finish_on_device(x: SplitSample | torch.Tensor, cfg: Any, device: str | torch.device,
                     memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A split-pipeline batch -> the float (N, 3, H, W) batch train_transform / eval_transform would give.

    x is a batched SplitSample (training: flip, jitter, lighting, normalize), a batched EncodedSample
    (device-decode: decode_on_device first) or a uint8 (N, H, W, 3) tensor (evaluation: normalize).
    cfg is the DataConfig.
    """
    if isinstance(x, EncodedSample):
        pixels, params = decode_on_device(x, (cfg.image_size, cfg.image_size), device), x
    else:
        pixels, params = (x, None) if isinstance(x, torch.Tensor) else (x.pixels, x)
        pixels = pixels.to(device, non_blocking=True)
    if params is not None and cfg.hflip and bool(params.flip.any()):
        # Flipped first, on uint8 (a quarter of the bytes): every later step treats all pixels alike,
        # so this equals train_transform's flip at the end (but for the order of the contrast mean's sum).
        idx = params.flip.nonzero().flatten().to(device, non_blocking=True)
        pixels = pixels.index_copy(0, idx, pixels.index_select(0, idx).flip(2))
    # NCHW from here: the per-channel steps run several times slower on a channels-last layout on CPUs.
    img = pixels.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255)
    if params is not None and cfg.color_jitter > 0:
        img = _color_jitter(img, params.jitter, params.order)
    if params is not None and cfg.lighting > 0:
        eigval = torch.tensor(IMAGENET_EIGVAL, dtype=torch.float32)
        eigvec = torch.tensor(IMAGENET_EIGVEC, dtype=torch.float32)
        rgb = (params.alpha * eigval) @ eigvec.T  # row i: eigvec @ (alpha_i * eigval), as Lighting adds it
        img.add_(rgb.to(device, non_blocking=True).view(-1, 3, 1, 1))
    mean, std = _mean_std(tuple(cfg.mean), tuple(cfg.std), str(img.device))
    img.sub_(mean).div_(std)
    return img.contiguous(memory_format=memory_format)


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalization constants on the device, made once: a tensor built from Python numbers on a GPU
    at every step would wait for the GPU's queued work (a synchronous copy) and stall the pipeline.
    Everything else finish_on_device sends is computed on the CPU and copied without waiting."""
    return (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
            torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device))


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


class SeededImageFolder(torch.utils.data.Dataset):
    """ImageFolder whose augmentation depends only on (seed, epoch, index)."""

    def __init__(self, root: str | Path, split: str, transform: Transform | None, seed: int, *,
                 scan: DatasetScan | None = None, cache: DecodedCache | None = None) -> None:
        """With `scan` (from scan_layout on the same root), take its file list instead of walking the folders;
        with `cache`, keep decoded images in memory (see DecodedCache)."""
        split_dir = Path(root).expanduser() / split
        if scan is None and archive_kind(root):
            scan = scan_layout(root)  # a folder of archives: its index lists the members
        if scan is not None:
            self.classes = list(scan.info.classes)
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
            self.samples: list[tuple[Source, int]] = scan.samples(split)
        else:
            require_dir(split_dir, f"{split} split folder",
                         f"put one sub-folder per class under it (run check_layout on {root})")
            try:
                self.classes, self.class_to_idx = find_classes(split_dir)
                self.samples = make_dataset(split_dir, self.class_to_idx, extensions=IMG_EXTENSIONS)
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
        self.cache = cache

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
        reads = getattr(self.transform, "reads_files", False)  # the split pipeline decodes what its crop needs
        img = None if reads else self._load(path)
        if self.transform is None:
            return v2.functional.pil_to_tensor(img).to(torch.float32).div_(255.0), target
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA's global RNG, which
            # fork_rng(devices=[]) does not restore, and the training loop's GPU draws would shift.
            torch.random.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
            if not reads:
                return self.transform(img), target
            try:
                if self.cache is not None and getattr(self.transform, "caches", False):
                    out = self.transform(path, cache=self.cache)
                else:
                    out = self.transform(path)
            except READ_ERRORS as exc:
                raise unreadable_error(path, exc) from exc
        return out, target

    def _load(self, path: Source) -> Image.Image:
        """The decoded RGB image, from the cache when it holds it (transforms never modify their input)."""
        if self.cache is None:
            return load_rgb(path)
        img = self.cache.get(path)
        if img is None:
            img = load_rgb(path)
            self.cache.put(path, img, img.width * img.height * 3)
        return img
