"""Tests for ablation.data.synth: files, determinism, cache, safety and class structure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ablation.data.synth import MAX_CLASSES, SHAPES, SynthSpec, class_names, draw_colours, render_image, shape_coverage, write_synth
from ablation.errors import DataError

TINY = SynthSpec(classes=3, train_per_class=4, val_per_class=2, size=32, seed=1)


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writes_imagefolder_layout_of_real_jpegs(tmp_path: Path) -> None:
    root = tmp_path / "synth"
    assert write_synth(root, TINY) is True
    for split, n in (("train", 4), ("val", 2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == ["00_disk", "01_ring", "02_square"]
        for name in classes:
            files = sorted((root / split / name).iterdir())
            assert [f.name for f in files] == [f"{name}_{i:05d}.JPEG" for i in range(n)]
            for f in files:
                assert f.read_bytes()[:2] == b"\xff\xd8"  # JPEG SOI marker, not a renamed PNG
                with Image.open(f) as img:
                    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
    marker = json.loads((root / "synth.json").read_text())
    assert marker["spec"]["classes"] == 3 and marker["spec"]["scale"] == [0.35, 0.65]
    assert "format_version" in marker


def test_same_spec_is_byte_identical_and_seed_matters(tmp_path: Path) -> None:
    write_synth(tmp_path / "a", TINY)
    write_synth(tmp_path / "b", TINY)
    write_synth(tmp_path / "c", SynthSpec(**{**TINY.__dict__, "seed": 2}))
    a, b, c = (_files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_subprocess_gives_identical_bytes(tmp_path: Path) -> None:
    """A fresh interpreter (other hash seed, other process) writes the same bytes."""
    write_synth(tmp_path / "a", TINY)
    code = ("import sys; from ablation.data.synth import SynthSpec, write_synth; "
            "write_synth(sys.argv[1], SynthSpec(classes=3, train_per_class=4, val_per_class=2, size=32, seed=1))")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True,
                   cwd=Path(__file__).resolve().parents[1])
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_cache_hit_returns_false_and_keeps_files(tmp_path: Path) -> None:
    root = tmp_path / "s"
    assert write_synth(root, TINY)
    mtime = (root / "synth.json").stat().st_mtime_ns
    assert write_synth(root, TINY) is False
    assert (root / "synth.json").stat().st_mtime_ns == mtime


def test_different_spec_raises(tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_synth(root, TINY)
    with pytest.raises(DataError, match="different synthetic dataset") as info:
        write_synth(root, SynthSpec(**{**TINY.__dict__, "noise": 0.1}))
    assert str(root) in str(info.value) and "\n" not in str(info.value)


def test_foreign_non_empty_folder_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty") as info:
        write_synth(root, TINY)
    assert str(root) in str(info.value)
    assert (root / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    root.mkdir()
    assert write_synth(root, TINY) and (root / "synth.json").is_file()


def test_no_temp_folder_left_behind(tmp_path: Path) -> None:
    write_synth(tmp_path / "s", TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ablation.data.synth as synth

    calls = {"n": 0}
    real = synth.encode_jpeg

    def flaky(pixels: np.ndarray, quality: int) -> bytes:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # an interrupted run
        return real(pixels, quality)

    monkeypatch.setattr(synth, "encode_jpeg", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_synth(tmp_path / "s", TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("classes", [1, 0, MAX_CLASSES + 1])
def test_classes_out_of_range(tmp_path: Path, classes: int) -> None:
    with pytest.raises(DataError, match="classes") as info:
        write_synth(tmp_path / "s", SynthSpec(classes=classes))
    assert f"2 to {MAX_CLASSES}" in str(info.value)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("field,value", [("quality", 0), ("noise", -0.1), ("min_colour_distance", 2.0),
                                         ("scale", (0.7, 0.3)), ("size", 2), ("train_per_class", 0)])
def test_bad_fields_name_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(DataError, match=field):
        write_synth(tmp_path / "s", SynthSpec(**{field: value}))


def test_supports_at_least_16_distinct_shapes() -> None:
    assert MAX_CLASSES >= 16
    names = class_names(MAX_CLASSES)
    assert names[:2] == ["00_disk", "01_ring"] and len(set(names)) == len(names)
    spec = SynthSpec(classes=MAX_CLASSES, size=48, position=0.0, rotation=0.0, scale=(0.8, 0.8))
    masks = [shape_coverage(spec, c, np.random.default_rng(0)) for c in range(MAX_CLASSES)]
    for name, m in zip(names, masks):
        assert 0.03 < m.mean() < 0.6, name  # something is drawn, and it is not the whole image
    for i in range(MAX_CLASSES):
        for j in range(i + 1, MAX_CLASSES):
            a, b = masks[i] > 0.5, masks[j] > 0.5
            iou = (a & b).sum() / (a | b).sum()
            assert iou < 0.85, (names[i], names[j], iou)


def test_colours_respect_distance_and_carry_no_class_signal() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        fg, bg = draw_colours(rng, 0.5)
        assert np.linalg.norm(fg - bg) >= 0.5
    # Colour is a nuisance: averaged over images, every class has about the same colours.
    spec = SynthSpec(classes=4, size=16)
    means = np.array([[render_image(spec, 0, c, i).reshape(-1, 3).mean(0) / 255 for i in range(60)]
                      for c in range(4)])  # (class, image, rgb)
    class_means = means.mean(axis=1)
    assert np.abs(class_means - class_means.mean(axis=0)).max() < 0.1
    assert means.std(axis=1).min() > 0.1  # while colours vary a lot between images


def test_nuisances_change_pixels_not_layout() -> None:
    base = SynthSpec(classes=2, size=32, noise=0.0)
    plain = render_image(base, 0, 0, 3).astype(int)
    bright = render_image(SynthSpec(**{**base.__dict__, "brightness": 0.5, "contrast": 0.5}), 0, 0, 3)
    assert plain.shape == bright.shape == (32, 32, 3)
    assert np.abs(plain - bright.astype(int)).max() > 0
    noisy = render_image(SynthSpec(**{**base.__dict__, "noise": 0.05}), 0, 0, 3).astype(int)
    assert 5 < np.abs(noisy - plain).mean() < 25  # sigma 0.05 = 12.75 levels; |N| mean ~ 10


def test_shapes_table_has_the_required_classes() -> None:
    names = [n for n, _ in SHAPES]
    for required in ("disk", "ring", "square", "square_outline", "triangle", "plus", "x",
                     "hstripes", "vstripes", "checkerboard"):
        assert required in names
    assert names[:10] == ["disk", "ring", "square", "square_outline", "triangle", "plus", "x",
                          "hstripes", "vstripes", "checkerboard"]


def test_synth_does_not_import_torch() -> None:
    code = "import sys, ablation.data.synth; sys.exit(1 if 'torch' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_progress_prints_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    write_synth(tmp_path / "s", TINY, progress=True)
    captured = capsys.readouterr()  # not a terminal: one line at the end, no carriage returns
    assert captured.out == "" and captured.err == "synth: 18 images\n"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    write_synth(tmp_path / "t", TINY, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rsynth: ") and err.endswith("\rsynth: 18/18 images\n")
