"""data.cache_gb: decoded images kept in memory give the same samples as reading the files every epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import split_cfg as cfg  # the paper's augmentation at 24 px, split pipeline

import ablation.data.pipelines as pipelines_module
from ablation import config
from ablation.data.layout import load_rgb
from ablation.data.pipelines import DecodedCache, SeededImageFolder, SplitTrainTransform, pipeline_transforms
from ablation.data.synth import SynthSpec, write_synth
from ablation.errors import ConfigError
from ablation.train.trainer import decoded_cache, train

# 96 px images cropped to 24 px with the paper's crop scales: some crops decode at reduced scale, some at full size.
SPEC = SynthSpec(classes=3, train_per_class=6, val_per_class=2, size=96, seed=9)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cache"
    write_synth(path, SPEC)
    return path


def epoch_samples(ds: SeededImageFolder, epoch: int) -> list:
    """Every sample of one epoch, in index order."""
    ds.set_epoch(epoch)
    return [ds[i] for i in range(len(ds))]


def assert_same(a: list, b: list) -> None:
    """Equal samples, field by field (pixels, parameters, labels)."""
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert ya == yb
        fields_a = xa if isinstance(xa, tuple) else (xa,)
        fields_b = xb if isinstance(xb, tuple) else (xb,)
        assert all(torch.equal(fa, fb) for fa, fb in zip(fields_a, fields_b))


@pytest.mark.parametrize("pipeline", ["split", "reference"])
def test_cached_epochs_equal_uncached_ones(root: Path, pipeline: str) -> None:
    train_tf, val_tf = pipeline_transforms(cfg(pipeline=pipeline))
    cache = DecodedCache(2**30)
    plain = SeededImageFolder(root, "train", train_tf, seed=4)
    cached = SeededImageFolder(root, "train", train_tf, seed=4, cache=cache)
    for epoch in range(3):
        assert_same(epoch_samples(cached, epoch), epoch_samples(plain, epoch))
    assert cache.hits > 0 and cache.items
    if pipeline == "split":
        # What it keeps is the whole image decoded at full size, and reduced-scale crops still read the file.
        split = SplitTrainTransform(cfg())
        for _ in range(2):
            epoch_samples(SeededImageFolder(root, "train", split, seed=4, cache=DecodedCache(2**30)), 0)
        assert 0 < split.reduced < split.images
    for path, kept in cache.items.items():
        assert np.array_equal(np.asarray(kept), np.asarray(load_rgb(path)))
    val_cache = DecodedCache(2**30)
    val_plain = SeededImageFolder(root, "val", val_tf, seed=4)
    val_cached = SeededImageFolder(root, "val", val_tf, seed=4, cache=val_cache)
    for epoch in range(2):
        assert_same(epoch_samples(val_cached, epoch), epoch_samples(val_plain, epoch))
    assert val_cache.hits == len(val_plain) and val_cache.misses == len(val_plain)


@pytest.mark.parametrize("pipeline", ["split", "reference"])
def test_whole_image_crops_read_no_file_after_the_first_epoch(root: Path, pipeline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo's setting: the crop is the whole image at its own size, so every image is decoded at full size.
    c = cfg(pipeline=pipeline, image_size=96, eval_resize=96, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    train_tf, _ = pipeline_transforms(c)
    cache = DecodedCache(2**30)
    ds = SeededImageFolder(root, "train", train_tf, seed=1, cache=cache)
    first = epoch_samples(ds, 0)
    assert cache.misses == len(ds) and cache.used == len(ds) * 96 * 96 * 3

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached image was read from its file again")

    monkeypatch.setattr(pipelines_module.Image, "open", no_reading)
    monkeypatch.setattr(pipelines_module.Path, "read_bytes", no_reading)
    second = epoch_samples(ds, 1)
    assert cache.hits == len(ds)
    monkeypatch.undo()
    assert_same(second, epoch_samples(SeededImageFolder(root, "train", train_tf, seed=1), 1))
    assert_same(first, epoch_samples(SeededImageFolder(root, "train", train_tf, seed=1), 0))


def test_the_budget_bounds_what_is_kept(root: Path) -> None:
    train_tf, _ = pipeline_transforms(cfg(pipeline="reference"))
    cache = DecodedCache(2 * 96 * 96 * 3 + 5)  # room for two images
    ds = SeededImageFolder(root, "train", train_tf, seed=2, cache=cache)
    samples = epoch_samples(ds, 0) + epoch_samples(ds, 1)
    assert len(cache.items) == 2 and cache.used <= cache.limit
    plain = SeededImageFolder(root, "train", train_tf, seed=2)
    assert_same(samples, epoch_samples(plain, 0) + epoch_samples(plain, 1))


def test_cache_gb_is_checked_and_leaves_the_run_id_alone(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match="data.cache_gb must be >= 0"):
        config.load(None, ["data.cache_gb=-1"])
    base = config.load(None, [])
    on = config.load(None, ["data.cache_gb=0.5", "data.workers=0"])
    assert config.run_id(on) == config.run_id(base)
    assert decoded_cache(base) is None and decoded_cache(on).limit == 2**29
    with caplog.at_level(logging.WARNING, logger="ablation"):
        assert decoded_cache(config.load(None, ["data.cache_gb=1", "data.workers=2"])) is None
    assert "data.cache_gb=1 is ignored with data.workers=2" in caplog.text


def test_a_run_with_the_cache_equals_one_without(tiny_data: Path, tmp_path: Path) -> None:
    from helpers import TINY

    from ablation.train.distributed import DistEnv

    args = [*TINY, "gpus=4", "batch_per_gpu=4", "epochs=2", f"data.root={tiny_data}", "data.workers=0", "data.pipeline=split"]
    env = DistEnv(device="cpu")
    a = train(config.load(None, args), tmp_path / "plain", env)
    b = train(config.load(None, [*args, "data.cache_gb=0.1"]), tmp_path / "cached", env)
    keep = lambda final: {k: v for k, v in final.items() if k not in ("wall_seconds", "finished_at", "images_per_s")}  # noqa: E731
    assert keep(a) == keep(b)
    wa = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "cached" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
