"""Tests for ablation.data: layout check, transforms and the seeded ImageFolder."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ablation.data import (DatasetInfo, Lighting, SeededImageFolder, check_layout, eval_transform,
                           sample_seed, train_transform)
from ablation.errors import DataError
from ablation.synth import SynthSpec, write_synth

SPEC = SynthSpec(classes=3, train_per_class=4, val_per_class=2, size=32, seed=3)


def make_cfg(**overrides: object) -> SimpleNamespace:
    """A DataConfig stand-in with the paper's defaults scaled to tiny images."""
    fields = dict(root="", image_size=28, eval_resize=32, crop_scale=(0.08, 1.0),
                  crop_ratio=(0.75, 4 / 3), color_jitter=0.4, lighting=0.1, hflip=True,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    fields.update(overrides)
    return SimpleNamespace(**fields)


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
