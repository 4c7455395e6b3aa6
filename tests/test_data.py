"""Tests for ablation.data.layout and ablation.data.pipelines: layout check, transforms and the seeded ImageFolder."""

from __future__ import annotations

import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ablation, make_cfg, split_cfg
from PIL import Image
from torchvision.transforms import v2

import ablation.data.bench as bench_module
import ablation.data.pipelines as pipelines_module
from ablation.data.layout import DatasetInfo, check_layout, load_rgb, scan_layout
from ablation.data.pipelines import (
    Lighting,
    SeededImageFolder,
    SplitEvalTransform,
    SplitSample,
    SplitTrainTransform,
    draft_scale,
    eval_transform,
    finish_on_device,
    pipeline_transforms,
    read_crop,
    sample_seed,
    train_transform,
)
from ablation.data.synth import SynthSpec, write_synth
from ablation.errors import DataError

SPEC = SynthSpec(classes=3, train_per_class=4, val_per_class=2, size=32, seed=3)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset shared by the read-only tests."""
    root = tmp_path_factory.mktemp("data") / "synth"
    write_synth(root, SPEC)
    return root


@pytest.fixture()
def copy_root(synth_root: Path, tmp_path: Path) -> Path:
    """A private copy for tests that damage the dataset."""
    dst = tmp_path / "copy"
    shutil.copytree(synth_root, dst)
    return dst


# --- check_layout ------------------------------------------------------------------------------


def test_check_layout_counts(synth_root: Path) -> None:
    info = check_layout(synth_root)
    assert isinstance(info, DatasetInfo)
    assert info.classes == ("00_disk", "01_ring", "02_square")
    assert (info.train_images, info.val_images) == (12, 6)
    assert info.root == str(synth_root)
    assert len(info.fingerprint) == 16 and int(info.fingerprint, 16) >= 0
    assert check_layout(str(synth_root)).fingerprint == info.fingerprint


def test_fingerprint_changes_when_a_file_is_added_or_renamed(copy_root: Path) -> None:
    before = check_layout(copy_root).fingerprint
    src = copy_root / "val" / "01_ring" / "01_ring_00000.JPEG"
    shutil.copy(src, copy_root / "val" / "01_ring" / "extra.jpg")
    added = check_layout(copy_root)
    assert added.val_images == 7 and added.fingerprint != before
    (copy_root / "val" / "01_ring" / "extra.jpg").rename(copy_root / "val" / "01_ring" / "extra2.jpg")
    assert check_layout(copy_root).fingerprint not in (before, added.fingerprint)


def test_fingerprint_ignores_contents_and_non_images(copy_root: Path) -> None:
    before = check_layout(copy_root).fingerprint
    (copy_root / "train" / "00_disk" / "00_disk_00000.JPEG").write_bytes(b"\xff\xd8changed")
    (copy_root / "train" / "00_disk" / "notes.txt").write_text("not an image")
    assert check_layout(copy_root).fingerprint == before


def test_extensions_case_insensitive_and_nested(copy_root: Path) -> None:
    cls = copy_root / "train" / "00_disk"
    for f in cls.iterdir():
        f.unlink()
    (cls / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(cls / "sub" / "a.PNG")
    Image.new("RGB", (8, 8)).save(cls / "b.Jpeg", format="JPEG")
    info = check_layout(copy_root)
    assert info.train_images == 8 + 2
    assert len(SeededImageFolder(copy_root, "train", None, seed=0)) == info.train_images


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        check_layout(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(copy_root: Path, split: str) -> None:
    shutil.rmtree(copy_root / split)
    with pytest.raises(DataError, match="does not exist") as info:
        check_layout(copy_root)
    assert str(copy_root / split) in str(info.value)


def test_split_without_class_folders(copy_root: Path) -> None:
    shutil.rmtree(copy_root / "val")
    (copy_root / "val").mkdir()
    (copy_root / "val" / "loose.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders") as info:
        check_layout(copy_root)
    assert str(copy_root / "val") in str(info.value)


def test_empty_class_folder(copy_root: Path) -> None:
    (copy_root / "train" / "03_empty").mkdir()
    (copy_root / "train" / "03_empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files") as info:
        check_layout(copy_root)
    assert str(copy_root / "train" / "03_empty") in str(info.value)
    assert "\n" not in str(info.value)


def test_class_lists_differ(copy_root: Path) -> None:
    shutil.rmtree(copy_root / "val" / "01_ring")
    extra = copy_root / "val" / "99_extra"
    extra.mkdir()
    shutil.copy(copy_root / "val" / "00_disk" / "00_disk_00000.JPEG", extra / "x.JPEG")
    with pytest.raises(DataError, match="differ") as info:
        check_layout(copy_root)
    msg = str(info.value)
    assert "missing in val: 01_ring" in msg and "missing in train: 99_extra" in msg


def test_many_missing_classes_are_abbreviated(copy_root: Path) -> None:
    for i in range(10):
        d = copy_root / "train" / f"x{i}"
        d.mkdir()
        (d / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"\(\+7 more\)"):
        check_layout(copy_root)


def test_root_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(DataError, match="not a folder"):
        check_layout(f)


# --- transforms ----------------------------------------------------------------------------


def _img(w: int = 40, h: int = 30) -> Image.Image:
    """A deterministic colourful test image."""
    x = torch.linspace(0, 1, w).expand(h, w)
    y = torch.linspace(0, 1, h).unsqueeze(1).expand(h, w)
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


def test_train_and_eval_output_shapes() -> None:
    cfg = make_cfg()
    torch.manual_seed(0)
    out = train_transform(cfg)(_img())
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, 28, 28)
    ev = eval_transform(cfg)(_img())
    assert type(ev) is torch.Tensor and ev.dtype == torch.float32 and ev.shape == (3, 28, 28)


def test_eval_is_resize_centre_crop_normalize() -> None:
    cfg = make_cfg(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), image_size=30, eval_resize=30)
    img = _img(60, 30)  # shorter side already 30: resize is identity, crop takes the middle 30 columns
    out = eval_transform(cfg)(img)
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1)[:, :, 15:45] / 255
    assert torch.allclose(out, expected, atol=1e-6)
    norm = eval_transform(make_cfg(image_size=30, eval_resize=30))(img)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
    assert torch.allclose(norm, (expected - mean) / std, atol=1e-5)


def test_eval_is_deterministic_and_uses_no_rng() -> None:
    state = torch.get_rng_state()
    a = eval_transform(make_cfg())(_img())
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, eval_transform(make_cfg())(_img()))


def test_train_transform_uses_torch_rng_only() -> None:
    t = train_transform(make_cfg())
    torch.manual_seed(5)
    a = t(_img())
    torch.manual_seed(5)
    b = t(_img())
    torch.manual_seed(6)
    c = t(_img())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_train_transform_skips_disabled_steps() -> None:
    cfg = make_cfg(color_jitter=0.0, lighting=0.0, hflip=False, crop_scale=(1.0, 1.0),
                   crop_ratio=(4 / 3, 4 / 3), image_size=30, mean=(0, 0, 0), std=(1, 1, 1))
    t = train_transform(cfg)
    names = [type(s).__name__ for s in t.transforms]
    assert "ColorJitter" not in names and "Lighting" not in names and "RandomHorizontalFlip" not in names
    out = t(_img(40, 30))  # full-image crop of the right aspect, resized 40x30 -> 30x30
    assert out.shape == (3, 30, 30) and 0.0 <= out.min() and out.max() <= 1.0


def test_train_transform_order() -> None:
    names = [type(s).__name__ for s in train_transform(make_cfg()).transforms]
    order = ["RandomResizedCrop", "ColorJitter", "Lighting", "Normalize", "RandomHorizontalFlip"]
    assert [n for n in names if n in order] == order


def test_lighting_zero_is_identity_and_draws_nothing() -> None:
    x = torch.rand(3, 5, 5)
    state = torch.get_rng_state()
    assert Lighting(0.0)(x) is x
    assert torch.equal(torch.get_rng_state(), state)


def test_lighting_adds_a_per_channel_constant() -> None:
    x = torch.rand(3, 6, 7)
    torch.manual_seed(0)
    y = Lighting(0.1)(x)
    delta = y - x
    assert delta.abs().max() > 0
    per_channel = delta.flatten(1)
    assert torch.allclose(per_channel, per_channel[:, :1].expand_as(per_channel), atol=1e-6)
    # and the offset is eigvec @ (alpha * eigval) with alpha ~ N(0, 0.1) from torch's RNG
    torch.manual_seed(0)
    alpha = torch.randn(3) * 0.1
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])
    assert torch.allclose(per_channel[:, 0], eigvec @ (alpha * eigval), atol=1e-6)


# --- SeededImageFolder --------------------------------------------------------------------------


def test_folder_samples_match_torchvision_order(synth_root: Path) -> None:
    from torchvision.datasets import ImageFolder

    ds = SeededImageFolder(synth_root, "train", None, seed=0)
    ref = ImageFolder(str(synth_root / "train"))
    assert ds.classes == ref.classes
    assert [(Path(p), t) for p, t in ds.samples] == [(Path(p), t) for p, t in ref.samples]
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == ref.samples[5][1]


def test_same_epoch_and_index_give_same_tensor(synth_root: Path) -> None:
    t = train_transform(make_cfg())
    a = SeededImageFolder(synth_root, "train", t, seed=7)
    b = SeededImageFolder(synth_root, "train", t, seed=7)
    torch.manual_seed(123)  # the global state must not matter
    xa = a[3][0]
    torch.manual_seed(456)
    xb = b[3][0]
    assert torch.equal(xa, xb)
    assert torch.equal(a[-1][0], a[len(a) - 1][0])
    a.set_epoch(1)
    assert not torch.equal(a[3][0], xa)
    assert not torch.equal(SeededImageFolder(synth_root, "train", t, seed=8)[3][0], xa)


def test_getitem_leaves_global_rng_untouched(synth_root: Path) -> None:
    ds = SeededImageFolder(synth_root, "train", train_transform(make_cfg()), seed=0)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    ds[0]
    ds[1]
    assert torch.equal(torch.get_rng_state(), state)


def _epoch_batches(ds: SeededImageFolder, workers: int) -> torch.Tensor:
    """All images of one epoch in order, loaded with the given worker count."""
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, num_workers=workers)
    return torch.cat([x for x, _ in loader])


def test_worker_count_does_not_change_augmentation(synth_root: Path) -> None:
    ds = SeededImageFolder(synth_root, "train", train_transform(make_cfg()), seed=11)
    ds.set_epoch(2)
    serial = _epoch_batches(ds, 0)
    parallel = _epoch_batches(ds, 2)
    assert torch.equal(serial, parallel)
    ds.set_epoch(3)
    assert not torch.equal(_epoch_batches(ds, 2), serial)  # set_epoch reaches fresh workers


def test_sample_seed_is_64_bit_and_mixes_all_inputs() -> None:
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= s < 2**64 for s in seeds)
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1)
    torch.manual_seed(sample_seed(-1, 0, 0))  # negative seeds map into range too


def test_corrupt_image_raises_data_error_naming_file(copy_root: Path) -> None:
    bad = copy_root / "train" / "01_ring" / "01_ring_00002.JPEG"
    bad.write_bytes(b"\xff\xd8 this is not really a jpeg")
    ds = SeededImageFolder(copy_root, "train", train_transform(make_cfg()), seed=0)
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match="cannot read image") as info:
        ds[index]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_truncated_image_raises_data_error(copy_root: Path) -> None:
    bad = copy_root / "val" / "00_disk" / "00_disk_00001.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = SeededImageFolder(copy_root, "val", eval_transform(make_cfg()), seed=0)
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match=str(bad)):
        ds[index]


def test_folder_missing_split_or_empty_class(copy_root: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        SeededImageFolder(copy_root, "test", None, seed=0)
    (copy_root / "val" / "05_empty").mkdir()
    with pytest.raises(DataError, match="05_empty"):
        SeededImageFolder(copy_root, "val", None, seed=0)


# --- the dataset scan (one walk per start) ------------------------------------------------------


def test_scan_lists_samples_in_torchvision_order(tmp_path: Path) -> None:
    # Nested folders and names where plain sorting and os.walk's order disagree ('b/x' < 'z' < 'b-c/q').
    for split in ("train", "val"):
        for cls in ("a", "a-b", "c"):
            for rel in ("z.jpg", "b/x.JPEG", "b/y.png", "b-c/q.jpg", "0.jpeg", "b/d/e.jpg", "notes.txt"):
                f = tmp_path / split / cls / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(b"")
    scan = scan_layout(tmp_path)
    assert scan.info == check_layout(tmp_path)
    for split in ("train", "val"):
        walked = SeededImageFolder(tmp_path, split, None, seed=0)
        given = SeededImageFolder(tmp_path, split, None, seed=0, scan=scan)
        assert given.samples == walked.samples and given.classes == walked.classes
        assert given.class_to_idx == walked.class_to_idx and given.targets == walked.targets


def test_folder_given_a_scan_does_not_walk(synth_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scan = scan_layout(synth_root)

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("walked the folders again")

    monkeypatch.setattr(pipelines_module, "make_dataset", no_walk)
    monkeypatch.setattr(pipelines_module, "find_classes", no_walk)
    ds = SeededImageFolder(synth_root, "train", None, seed=0, scan=scan)
    assert len(ds) == scan.info.train_images and ds[0][0].shape == (3, 32, 32)


# --- the split pipeline --------------------------------------------------------------------------

# 96-px images cropped to 24 px: crops of 48 px or more decode at 1/2 scale, whole images at 1/4.
SPLIT_SPEC = SynthSpec(classes=3, train_per_class=8, val_per_class=2, size=96, seed=5)


@pytest.fixture(scope="module")
def split_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "split"
    write_synth(root, SPLIT_SPEC)
    return root


def recording(transform: v2.Compose) -> dict[str, object]:
    """Make the reference transform's random steps record the parameters they draw into the returned dict."""
    log: dict[str, object] = {}
    steps = {type(t): t for t in transform.transforms}

    def record(obj: object, method: str, key: str) -> None:
        original = getattr(obj, method)

        def wrapper(*args: object) -> object:
            log[key] = out = original(*args)
            return out

        setattr(obj, method, wrapper)

    record(steps[v2.RandomResizedCrop], "make_params", "crop")
    if v2.ColorJitter in steps:
        record(steps[v2.ColorJitter], "make_params", "jitter")
    if Lighting in steps:
        record(steps[Lighting], "draw", "alpha")
    if v2.RandomHorizontalFlip in steps:
        flip = steps[v2.RandomHorizontalFlip]
        transform_one = flip.transform

        def flipping(inpt: object, params: dict) -> object:  # v2 calls it only when the coin says flip
            log["flip"] = True
            return transform_one(inpt, params)

        flip.transform = flipping
    return log


@pytest.mark.parametrize("seed,epoch", [(0, 0), (7, 3), (2**40 + 5, 1)])
def test_split_draws_the_reference_parameters(split_root: Path, seed: int, epoch: int) -> None:
    cfg = split_cfg()
    reference = train_transform(cfg)
    log = recording(reference)
    split = SplitTrainTransform(cfg)
    ds = SeededImageFolder(split_root, "train", split, seed=seed)
    ds.set_epoch(epoch)
    flips = set()
    for index, (path, _) in enumerate(ds.samples):
        img = load_rgb(path)
        torch.manual_seed(sample_seed(seed, epoch, index))
        log.clear()
        log["flip"] = False
        reference(img)
        after_reference = torch.get_rng_state()
        torch.manual_seed(sample_seed(seed, epoch, index))
        p = split.params(*img.size)
        assert torch.equal(torch.get_rng_state(), after_reference)  # same number of draws, same order
        c, j = log["crop"], log["jitter"]
        assert p.box == (c["left"], c["top"], c["left"] + c["width"], c["top"] + c["height"])
        assert p.jitter == (j["brightness_factor"], j["contrast_factor"], j["saturation_factor"])
        assert p.order == tuple(j["fn_idx"].tolist())
        assert torch.equal(p.alpha, log["alpha"]) and p.flip == log["flip"]
        # ... and the sample a loader worker ships carries exactly these
        sample, _ = ds[index]
        assert sample.pixels.dtype == torch.uint8 and sample.pixels.shape == (24, 24, 3)
        assert sample.jitter.tolist() == list(p.jitter) and sample.order.tolist() == list(p.order)
        assert torch.equal(sample.alpha, p.alpha) and bool(sample.flip) == p.flip
        flips.add(p.flip)
    assert flips == {True, False}


def test_split_draws_match_with_steps_turned_off(split_root: Path) -> None:
    cfg = split_cfg(color_jitter=0.0, lighting=0.0, hflip=False)
    reference, split = train_transform(cfg), SplitTrainTransform(cfg)
    log = recording(reference)
    for index, (path, _) in enumerate(SeededImageFolder(split_root, "train", None, seed=0).samples[:6]):
        img = load_rgb(path)
        torch.manual_seed(index)
        reference(img)
        state = torch.get_rng_state()
        torch.manual_seed(index)
        p = split.params(*img.size)
        assert torch.equal(torch.get_rng_state(), state)
        c = log["crop"]
        assert p.box == (c["left"], c["top"], c["left"] + c["width"], c["top"] + c["height"])
        assert (p.jitter, p.order, p.alpha, p.flip) == (None, None, None, False)


def equivalent_route(path: str, box: tuple[int, int, int, int], scale: int, size: int) -> torch.Tensor:
    """The reference's pixels by another legitimate resampling route: full decode, box-average the
    image down by `scale` in the pixel domain (what DCT scaling approximates), then PIL's bilinear
    from the fractional box. With scale 1 it is the reference's crop and resize exactly."""
    img = load_rgb(path)
    if scale == 1:
        out = img.crop(box).resize((size, size), Image.BILINEAR)
    else:
        out = img.reduce(scale).resize((size, size), Image.BILINEAR, box=tuple(v / scale for v in box))
    return torch.from_numpy(np.array(out))


def test_split_pixels_match_the_reference_up_to_resampling(split_root: Path) -> None:
    cfg = split_cfg()
    split = SplitTrainTransform(cfg)
    ref_ds = SeededImageFolder(split_root, "train", train_transform(cfg), seed=1)
    split_ds = SeededImageFolder(split_root, "train", split, seed=1)
    samples = [split_ds[i][0] for i in range(len(split_ds))]
    batch = torch.utils.data.default_collate(samples)
    assert isinstance(batch, SplitSample) and batch.pixels.shape == (len(samples), 24, 24, 3)
    got = finish_on_device(batch, cfg, "cpu")  # one batch: several jitter orders and flips at once
    assert got.shape == (len(samples), 3, 24, 24) and got.dtype == torch.float32 and got.is_contiguous()
    assert len({tuple(o) for o in batch.order.tolist()}) > 1 and 0 < int(batch.flip.sum()) < len(samples)

    full, reduced, route = [], [], []
    for i, (path, _) in enumerate(split_ds.samples):
        reference = ref_ds[i][0]
        diff = (got[i] - reference).abs()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(1, 0, i))
            p = split.params(*load_rgb(path).size)
        left, top, right, bottom = p.box
        scale = draft_scale(right - left, bottom - top, 24, 24)
        if scale == 1:
            # Same decoder output; torch's uint8 bilinear vs PIL's: at most one level apart, which
            # brightness, contrast and saturation (factors up to 1.4 each) and the std can magnify.
            assert diff.max() <= 1.4**3 / 255 / 0.224 + 1e-5, (i, diff.max())
            full.append(diff.mean().item())
        else:
            other_sample = samples[i]._replace(pixels=equivalent_route(path, p.box, scale, 24))
            other = finish_on_device(torch.utils.data.default_collate([other_sample]), cfg, "cpu")[0]
            reduced.append(diff.mean().item())
            route.append((other - reference).abs().mean().item())
    assert full and reduced and route  # both kinds occur in this data
    assert statistics.mean(full) < 2e-3
    # Decoding at reduced scale differs from the reference as much as another resampling route does.
    assert statistics.mean(reduced) <= 1.25 * statistics.mean(route), (reduced, route)
    assert max(reduced) <= 1.5 * max(route)


def test_full_size_decode_is_pils_with_or_without_torchvision(big_jpeg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    box = (30, 20, 430, 300)
    want = np.array(load_rgb(str(big_jpeg)).crop(box))
    data = big_jpeg.read_bytes()
    with Image.open(big_jpeg) as img:
        assert np.array_equal(pipelines_module._decode_crop(img, data, box).numpy(), want)
    monkeypatch.setattr(pipelines_module, "_tv_decode_jpeg", None)  # a torchvision without image decoders
    with Image.open(big_jpeg) as img:
        assert np.array_equal(pipelines_module._decode_crop(img, data, box).numpy(), want)


def test_split_eval_equals_reference_eval(split_root: Path) -> None:
    cfg = split_cfg()
    ref = SeededImageFolder(split_root, "val", eval_transform(cfg), seed=0)
    split = SeededImageFolder(split_root, "val", SplitEvalTransform(cfg), seed=0)
    pixels = torch.stack([split[i][0] for i in range(len(split))])
    assert pixels.dtype == torch.uint8 and pixels.shape == (len(split), 24, 24, 3)
    got = finish_on_device(pixels, cfg, "cpu")
    want = torch.stack([ref[i][0] for i in range(len(ref))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_pipeline_transforms_selects_the_pipeline() -> None:
    train, ev = pipeline_transforms(split_cfg())
    assert isinstance(train, SplitTrainTransform) and isinstance(ev, SplitEvalTransform)
    train, ev = pipeline_transforms(split_cfg(pipeline="reference"))
    assert isinstance(train, v2.Compose) and isinstance(ev, v2.Compose)


def test_draft_scale() -> None:
    assert draft_scale(448, 448, 224, 224) == 2
    assert draft_scale(447, 448, 224, 224) == 1  # a side below twice the output: full size
    assert draft_scale(900, 460, 224, 224) == 2
    assert draft_scale(1792, 1792, 224, 224) == 8 and draft_scale(5000, 5000, 224, 224) == 8
    assert draft_scale(100, 100, 224, 224) == 1  # enlarged: never decoded smaller


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 448-px JPEG (4:2:0, as cameras write them) of a synthetic image."""
    from ablation.data.synth import render_image

    path = tmp_path_factory.mktemp("big") / "big.jpg"
    Image.fromarray(render_image(SynthSpec(size=448, noise=0.02), 0, 3, 0)).save(path, quality=90)
    return path


@pytest.mark.parametrize("box,size,scale", [
    ((0, 0, 448, 448), 112, 4),  # 4x larger than needed: 1/4 scale
    ((0, 0, 448, 448), 56, 8),
    ((100, 50, 324, 274), 112, 2),
    ((0, 0, 200, 448), 112, 1),  # one side under 2x: full size
    ((10, 10, 60, 60), 112, 1),  # enlarged: full size
])
def test_read_crop_decodes_at_reduced_scale_only_when_shrinking(big_jpeg: Path, box: tuple, size: int, scale: int) -> None:
    data = big_jpeg.read_bytes()
    with Image.open(big_jpeg) as img:
        pixels, used = read_crop(img, box, (size, size), data)
        assert used == scale
        assert img.size == (448 // scale, 448 // scale)  # what libjpeg actually decoded
    assert pixels.dtype == torch.uint8 and pixels.shape == (size, size, 3)
    reference = np.array(load_rgb(str(big_jpeg)).crop(box).resize((size, size), Image.BILINEAR)).astype(float)
    assert np.abs(pixels.numpy() - reference).mean() < 3.0  # levels of 255: the same picture


def test_read_crop_of_non_jpeg_and_grayscale_images(tmp_path: Path, big_jpeg: Path) -> None:
    png = tmp_path / "big.png"
    load_rgb(str(big_jpeg)).save(png)
    with Image.open(png) as img:
        pixels, used = read_crop(img, (0, 0, 448, 448), (56, 56), png.read_bytes())
    assert used == 1 and pixels.shape == (56, 56, 3)  # no DCT scaling outside JPEG
    gray = tmp_path / "gray.jpg"
    load_rgb(str(big_jpeg)).convert("L").save(gray, quality=90)
    for box, want in (((0, 0, 448, 448), 8), ((0, 0, 100, 100), 1)):
        with Image.open(gray) as img:
            pixels, used = read_crop(img, box, (56, 56), gray.read_bytes())
        assert used == want and pixels.shape == (56, 56, 3)
        assert torch.equal(pixels[..., 0], pixels[..., 1]) and torch.equal(pixels[..., 1], pixels[..., 2])


def test_split_pipeline_names_an_unreadable_file(copy_root: Path) -> None:
    bad = copy_root / "train" / "01_ring" / "01_ring_00002.JPEG"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: torchvision refuses it, PIL says why
    ds = SeededImageFolder(copy_root, "train", SplitTrainTransform(make_cfg(pipeline="split")), seed=0)
    index = [p for p, _ in ds.samples].index(str(bad))
    with pytest.raises(DataError, match="cannot read image") as info:
        ds[index]
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


# Where two JPEG decoders meet (PIL's bundled libjpeg-turbo, torchvision's own build, nvJPEG), pixels may
# differ by one uint8 level: ISO/IEC 10918-2 lets a conforming decoder's output differ by 1 per sample, and
# libjpeg-turbo's SIMD paths and versions round chroma upsampling and colour conversion differently (seen
# with torchvision 0.29.1). Brightness, contrast and saturation jitter of 0.4 scale a level by at most
# 1.4 each, and normalization divides by the smallest std, 0.224: that bound, in normalized units.
ONE_LEVEL = 1.4**3 / 255 / 0.224 + 1e-5


def test_device_decode_draws_the_split_parameters_and_gives_the_full_scale_pixels(split_root: Path) -> None:
    from ablation.data.pipelines import DeviceDecodeTrainTransform, EncodedSample, collate

    cfg = split_cfg(pipeline="device-decode")
    split_ds = SeededImageFolder(split_root, "train", SplitTrainTransform(cfg), seed=3)
    dev_ds = SeededImageFolder(split_root, "train", DeviceDecodeTrainTransform(cfg), seed=3)
    ref_ds = SeededImageFolder(split_root, "train", train_transform(cfg), seed=3)
    n = len(dev_ds)
    loaded = list(torch.utils.data.DataLoader(dev_ds, batch_size=n, num_workers=2, collate_fn=collate))
    (batch, y), = loaded
    assert isinstance(batch, EncodedSample) and len(batch.encoded) == n and all(e.numel() for e in batch.encoded)
    assert y.tolist() == [t for _, t in dev_ds.samples]
    split = torch.utils.data.default_collate([split_ds[i][0] for i in range(n)])
    for name in ("jitter", "order", "alpha", "flip"):  # the very draws the split (and reference) pipeline makes
        assert torch.equal(getattr(batch, name), getattr(split, name)), name
    got = finish_on_device(batch, cfg, "cpu")
    assert got.shape == (n, 3, 24, 24) and got.dtype == torch.float32
    reduced = 0
    for i, (path, _) in enumerate(dev_ds.samples):
        left, top, right, bottom = batch.box[i].tolist()
        scale = draft_scale(right - left, bottom - top, 24, 24)
        reduced += scale > 1
        if scale == 1:  # the split pipeline decoded at full size too, with the same crop box, flip and jitter
            split_px = finish_on_device(torch.utils.data.default_collate([split_ds[i][0]]), cfg, "cpu")[0]
            assert (got[i] - split_px).abs().max() <= ONE_LEVEL, i
        # Always a full-size decode: within one uint8 level of the reference's pixels, magnified by jitter and std.
        assert (got[i] - ref_ds[i][0]).abs().max() <= ONE_LEVEL, i
    assert reduced  # the data holds crops the split pipeline decodes at reduced scale


def test_split_equals_reference_at_the_demos_settings(split_root: Path) -> None:
    # sweeps/demo.yaml runs data.pipeline=split because, with a whole-image crop at the source size and
    # no jitter or lighting, its pixels are the reference pipeline's: only where the flip and normalize run moves.
    cfg = make_cfg(pipeline="split", image_size=96, eval_resize=96, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), color_jitter=0.0,
                   lighting=0.0)
    ref = SeededImageFolder(split_root, "train", train_transform(cfg), seed=2)
    split = SeededImageFolder(split_root, "train", SplitTrainTransform(cfg), seed=2)
    batch = torch.utils.data.default_collate([split[i][0] for i in range(len(split))])
    assert 0 < int(batch.flip.sum()) < len(split)
    want = torch.stack([ref[i][0] for i in range(len(ref))])
    torch.testing.assert_close(finish_on_device(batch, cfg, "cpu"), want, rtol=0, atol=1e-6)


def test_device_decode_takes_non_jpeg_files_on_the_loader(copy_root: Path) -> None:
    from ablation.data.pipelines import DeviceDecodeTrainTransform, collate

    jpeg = copy_root / "train" / "01_ring" / "01_ring_00002.JPEG"
    png = jpeg.with_suffix(".png")
    load_rgb(str(jpeg)).save(png)
    cfg = make_cfg(pipeline="device-decode", image_size=24)
    ds = SeededImageFolder(copy_root, "train", DeviceDecodeTrainTransform(cfg), seed=0)
    paths = [p for p, _ in ds.samples]
    rows = [paths.index(str(png)), paths.index(str(jpeg))]
    x, _ = collate([ds[i] for i in rows])
    assert x.encoded[0].numel() == 0 and x.pixels[0].shape == (24, 24, 3)  # the PNG: cropped on the loader
    assert x.encoded[1].numel() > 0 and x.pixels[1].numel() == 0  # the JPEG: bytes for the device
    split = SeededImageFolder(copy_root, "train", SplitTrainTransform(make_cfg(pipeline="split", image_size=24)), seed=0)
    want = finish_on_device(torch.utils.data.default_collate([split[i][0] for i in rows]), cfg, "cpu")
    torch.testing.assert_close(finish_on_device(x, cfg, "cpu"), want, rtol=0, atol=1.4**3 / 255 / 0.224 + 1e-5)


def test_split_samples_do_not_depend_on_workers(split_root: Path) -> None:
    ds = SeededImageFolder(split_root, "train", SplitTrainTransform(split_cfg()), seed=4)
    ds.set_epoch(2)

    def epoch(workers: int) -> SplitSample:
        loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=workers)
        parts = [x for x, _ in loader]
        return SplitSample(*(torch.cat(field) for field in zip(*parts)))

    serial, parallel = epoch(0), epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


# --- ablation data bench ---------------------------------------------------------------------


def test_data_bench_reports_images_per_second_per_core(tiny_data: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["data", "bench", str(tiny_data), "data.pipeline=split", "--images", "12", "data.image_size=16", "gpus=2",
                     "device=cpu"], cli_env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"split pipeline: \d+\.\d images/s per core", lines[-1]), lines[-1]
    assert "12 training images" in lines[0] and "device side on cpu" in lines[0]
    rows = {line.split("pipeline")[0].strip(): line for line in lines if re.match(r"\s+(reference|split|device-decode) pipeline", line)}
    assert set(rows) == {"reference", "split", "device-decode"}
    for line in rows.values():  # loader + process = total, every CPU millisecond of an image
        loader, process, total = (float(v) for v in re.search(r"([\d.]+) \+ +([\d.]+) = +([\d.]+)", line).groups())
        assert total == pytest.approx(loader + process, abs=0.011)
    assert "decodes in the training process on a CPU device" in rows["device-decode"]
    assert any("feeding 2 GPU(s) x 2,500 images/s = 5,000 images/s takes" in line and "CPU cores" in line for line in lines)
    assert not any("data.pipeline=device-decode would" in line for line in lines)  # never recommended on a CPU device


def test_data_bench_on_device_decode_with_a_cpu_device_says_it_saves_nothing(tiny_data: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["data", "bench", str(tiny_data), "data.pipeline=device-decode", "--images", "8", "data.image_size=16",
                     "device=cpu"], cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "data.pipeline=device-decode saves no CPU on a CPU device" in proc.stdout


def test_data_bench_counts_the_training_process_and_the_loader(tiny_data: Path) -> None:
    """device-decode's loader only reads files; on a CPU device its decode is CPU time of the training process, counted."""
    from ablation import config

    cfg = config.load(None, ["data.image_size=16", "data.eval_resize=16"]).data
    r = bench_module.run(tiny_data, cfg, 12, device="cpu")
    assert r.device == "cpu" and r.device_ms == {}  # a CPU's device time is CPU time, already in process_ms
    assert r.process_ms["reference"] == 0.0 or r.process_ms["reference"] < r.process_ms["device-decode"]
    assert r.process_ms["device-decode"] > r.process_ms["split"] > 0  # decode + crop + resize + the photometric steps
    for p in ("reference", "split", "device-decode"):
        assert r.cpu_ms(p) == pytest.approx(1000 / r.rates[p] + r.process_ms[p])
        assert r.per_core(p) < r.rates[p] or p == "reference"
    assert "device-decode" not in r.allowed() and r.best() in ("reference", "split")


def _result(device: str, **process: float) -> bench_module.BenchResult:
    """A made-up measurement: device-decode's loader 50x faster than split's, the device sides as given."""
    rates = {"read": 20000.0, "decode": 400.0, "reference": 200.0, "split": 300.0, "device-decode": 15000.0}
    dev = {p: 1.0 for p in rates if p not in ("read", "decode")} if device.startswith("cuda") else {}
    return bench_module.BenchResult("root", 10, 2, (448, 448), rates, 0.0, device, {"reference": 0.0, "split": 0.2, **process}, dev)


def test_device_decode_is_recommended_only_where_the_device_is_a_gpu() -> None:
    gpu = _result("cuda", **{"device-decode": 0.3})  # nvJPEG: little host time
    assert gpu.best() == "device-decode"
    assert any("data.pipeline=device-decode would need" in line for line in bench_module.report(gpu, "split", 224, 8, 2500))
    cpu = _result("cpu", **{"device-decode": 0.3})  # even where the CPU figures favour it
    assert cpu.best() == "split"
    lines = bench_module.report(cpu, "reference", 224, 8, 2500)
    assert any("data.pipeline=split would need" in line for line in lines)
    assert not any("device-decode would" in line for line in lines)
    slow = _result("cuda", **{"device-decode": 5.0})  # a host-bound decode counts against it
    assert slow.best() == "split"


def test_data_bench_on_a_missing_folder_is_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["data", "bench", str(tmp_path / "nowhere"), "--images", "4"], cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert str(tmp_path / "nowhere") in proc.stderr


def test_pick_images_spreads_over_the_classes(synth_root: Path) -> None:
    from ablation.data.bench import pick_images

    scan = pick_images(synth_root, 5)
    samples = scan.samples("train")
    assert len(samples) == 5 and {t for _, t in samples} == {0, 1, 2}
    assert all(Path(p).is_file() for p, _ in samples)
    assert len(pick_images(synth_root, 100).samples("train")) == 12  # no more than there are


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (1.0, 1.0)), ((0.9, 1.0), (0.5, 0.6))])
def test_crop_box_draws_what_torchvisions_make_params_draws(scale: tuple, ratio: tuple) -> None:
    """SplitTrainTransform._crop_box: torchvision's box and the same RNG use, the central-crop fallback included."""
    split = SplitTrainTransform(split_cfg(crop_scale=scale, crop_ratio=ratio))
    fallbacks = 0
    for seed, (w, h) in enumerate([(96, 96), (500, 375), (375, 500), (400, 12), (12, 400), (33, 31)] * 20):
        torch.manual_seed(seed)
        c = split.crop.make_params([torch.empty((3, h, w), device="meta")])
        after = torch.get_rng_state()
        torch.manual_seed(seed)
        assert split._crop_box(w, h) == (c["left"], c["top"], c["left"] + c["width"], c["top"] + c["height"]), (w, h, seed)
        assert torch.equal(torch.get_rng_state(), after)
        fallbacks += (c["width"], c["height"]) in ((w, h), (w, int(round(w / ratio[0]))), (int(round(h * ratio[1])), h))
    assert fallbacks  # the elongated images exhaust the ten tries
