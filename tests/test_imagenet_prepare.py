"""`ablation data prepare imagenet`: every miniature source layout prepares to the same tree and labels; subsets are
recorded as such; each bad input gives its one line; a prepare killed half-way resumes and finishes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ablation.data import imagenet as inet
from ablation.data import miniature as mini
from ablation.data import prepare as prep
from ablation.data.layout import check_layout, load_rgb, open_image, scan_layout
from ablation.errors import DataError, DiskFullError

SPEC = mini.MiniSpec()  # 4 classes, 3 train / 2 val per class, 32 px; a CMYK JPEG and a PNG named .JPEG
NO_VERIFY = prep.Options(verify=False, workers=1)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A miniature of every source layout (the same images), written once."""
    root = tmp_path_factory.mktemp("imagenet-src")
    for layout in mini.LAYOUTS:
        mini.write_miniature(root / layout, layout, SPEC)
    return {layout: root / layout for layout in mini.LAYOUTS}


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each layout prepared (the official archives by a pool of 2 processes, the rest in this one)."""
    out = tmp_path_factory.mktemp("imagenet-out")
    return {layout: (out / layout, prep.prepare(src, out / layout, prep.Options(verify=False, workers=2 if layout == "official" else 1)))
            for layout, src in sources.items()}


def _tree(root: Path) -> dict[str, bytes]:
    """'split/wnid/file' -> bytes of a prepared tree (dataset.json aside)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != prep.DATASET_JSON}


def _copy(src: Path, tmp_path: Path) -> Path:
    """A private copy of a miniature source to damage."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# The facts and parsers.
# ---------------------------------------------------------------------------------------------


def test_the_miniature_devkit_numbers_classes_unlike_the_sorted_wnids_and_parses_back(sources) -> None:
    devkit = inet.read_devkit(sources["official"] / inet.DEVKIT)
    index = inet.class_index(s.wnid for s in devkit.classes)
    assert [s.ilsvrc_id - 1 for s in devkit.classes] != [index[s.wnid] for s in devkit.classes]  # ID - 1 is not the index
    assert len(devkit.synsets) == SPEC.classes + 2 and len(devkit.classes) == SPEC.classes  # inner synsets are no classes
    expected = {rel.split("/")[2]: rel.split("/")[1] for rel in mini.expected_tree(SPEC) if rel.startswith("val/")}
    assert devkit.val_labels == expected
    assert inet.parse_kaggle_val((sources["kaggle"] / inet.KAGGLE_VAL_CSV).read_text()) == expected
    assert [w for w, _ in inet.parse_kaggle_synsets((sources["kaggle"] / inet.KAGGLE_SYNSETS).read_text())] == sorted(index)


def test_hf_member_names_give_the_file_name_and_wnid() -> None:
    assert inet.hf_member("ILSVRC2012_val_00000293_n01440764.JPEG") == ("ILSVRC2012_val_00000293.JPEG", "n01440764")
    assert inet.hf_member("train/n01440764_10026_n01440764.JPEG") == ("n01440764_10026.JPEG", "n01440764")
    assert inet.hf_member("README.md") is None


@pytest.mark.parametrize("layout", mini.LAYOUTS)
def test_the_source_kind_is_recognised(sources, layout: str) -> None:
    assert inet.detect_source(sources[layout]).kind == layout


# ---------------------------------------------------------------------------------------------
# Every layout prepares to the same tree and labels.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", mini.LAYOUTS)
def test_each_layout_prepares_to_the_same_tree_and_labels(prepared, layout: str) -> None:
    root, doc = prepared[layout]
    assert _tree(root) == mini.expected_tree(SPEC)  # every file, byte for byte, in its wnid's folder
    info = check_layout(root)
    assert doc["fingerprint"] == info.fingerprint == prepared["official"][1]["fingerprint"]
    assert (doc["classes"], doc["train_images"], doc["val_images"]) == (4, 12, 8)
    assert doc["source"]["kind"] == layout and doc["subset"] is None and doc["imagenet_1k"] is False
    assert doc["odd_files"] == mini.odd_files(SPEC) == {
        f"train/n01440764/{mini.train_name('n01440764', 0)}": "CMYK JPEG", f"train/n01443537/{mini.train_name('n01443537', 0)}": "PNG"}
    assert json.loads((root / prep.DATASET_JSON).read_text()) == doc
    assert not (root / prep.STATE).exists()


def test_validation_targets_follow_the_sorted_wnids_not_the_ilsvrc_ids(prepared, sources) -> None:
    root, _ = prepared["official"]
    devkit = inet.read_devkit(sources["official"] / inet.DEVKIT)
    ids = {s.wnid: s.ilsvrc_id for s in devkit.classes}
    index = inet.class_index(ids)
    targets = {Path(p).name: t for p, t in scan_layout(root).samples("val")}
    assert targets == {name: index[w] for name, w in devkit.val_labels.items()}
    assert any(t != ids[devkit.val_labels[name]] - 1 for name, t in targets.items())


def test_the_odd_files_decode_to_the_same_rgb_in_every_pipeline(prepared) -> None:
    from ablation.data.pipelines import read_crop

    root, doc = prepared["kaggle"]
    for rel, kind in doc["odd_files"].items():
        path = str(root / rel)
        reference = np.asarray(load_rgb(path))  # the reference pipeline's decode
        img = open_image(path)
        assert (img.format, img.mode) == (("PNG", "RGB") if kind == "PNG" else ("JPEG", "CMYK"))
        h, w = reference.shape[:2]
        pixels, _ = read_crop(img, (0, 0, w, h), (h, w), Path(path).read_bytes())  # split and device-decode's loader route
        assert np.array_equal(pixels.numpy(), reference)


def test_data_check_recognises_each_download_and_says_what_to_run(sources, tmp_path) -> None:
    for layout in ("official", "kaggle", "hf"):
        line = prep.describe(sources[layout])
        assert inet.KIND_NAMES[layout] in line and f"ablation data prepare imagenet {sources[layout]} --out DEST" in line
    assert prep.describe(sources["imagefolder"]).endswith(f"fingerprint {check_layout(sources['imagefolder']).fingerprint}")
    with pytest.raises(DataError, match="holds no ImageNet source this harness knows"):
        prep.describe(sources["imagefolder"] / "train")
    half = tmp_path / "half"
    shutil.copytree(sources["imagefolder"] / "train", half / "train")
    with pytest.raises(DataError, match=r"val split folder .*/half/val does not exist; put one sub-folder per class"):
        prep.describe(half)


def test_a_prepared_tree_again_is_a_no_op_and_check_says_how_it_was_made(prepared, sources) -> None:
    root, doc = prepared["hf"]
    (root / prep.STATE / "partial").mkdir(parents=True)  # as a kill between dataset.json and the clean-up leaves it
    assert prep.prepare(sources["hf"], root, NO_VERIFY) == doc
    assert not (root / prep.STATE).exists()
    assert "prepared from the Hugging Face imagenet-1k tars, not verified" in prep.describe(root)
    with pytest.raises(DataError, match="from another source or subset; pick another --out"):
        prep.prepare(sources["kaggle"], root, NO_VERIFY)


# ---------------------------------------------------------------------------------------------
# Verification, subsets.
# ---------------------------------------------------------------------------------------------


def _expected(src: Path, **md5: str) -> prep.Expected:
    """The miniature's own counts, and its archives' md5s (overridden by md5)."""
    sums = {name: inet.md5_of(src / name) for name in (inet.TRAIN_TAR, inet.VAL_TAR, inet.DEVKIT)}
    return prep.Expected(classes=4, train_images=12, val_images=8, val_per_class=2, md5={**sums, **md5})


def test_verify_checks_the_md5s_and_the_counts(sources, tmp_path) -> None:
    src = sources["official"]
    doc = prep.prepare(src, tmp_path / "ok", prep.Options(workers=1, expected=_expected(src)))
    assert doc["verified"] and doc["imagenet_1k"] and doc["source"]["md5"][inet.VAL_TAR] == inet.md5_of(src / inet.VAL_TAR)
    sub = prep.prepare(src, tmp_path / "sub", prep.Options(workers=1, expected=_expected(src), subset=prep.Subset(classes=2)))
    assert sub["verified"] and not sub["imagenet_1k"] and (sub["classes"], sub["train_images"], sub["val_images"]) == (2, 6, 4)
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "md5", prep.Options(workers=1, expected=_expected(src, **{inet.VAL_TAR: "0" * 32})))
    assert str(e.value).startswith(f"{src / inet.VAL_TAR}: md5 {inet.md5_of(src / inet.VAL_TAR)} is not the published {'0' * 32}; ")
    assert "download it again" in str(e.value) and not (tmp_path / "md5" / prep.DATASET_JSON).exists()
    with pytest.raises(DataError, match=r"is not all of ImageNet-1k: 4 classes, not 1000; 12 train images, not 1,281,167; "
                                        r"8 val images, not 50,000; class n01440764 has 2 val images, not 50; .* --no-verify"):
        prep.prepare(sources["kaggle"], tmp_path / "counts", prep.Options(workers=1))
    assert not (tmp_path / "counts" / "train").exists()  # the check runs before a class folder moves in


def test_a_subset_is_deterministic_and_recorded_so_the_report_never_takes_it_for_imagenet(sources, tmp_path) -> None:
    from ablation.results.recipe import dataset_differences

    sub = prep.Options(verify=False, workers=1, subset=prep.Subset(classes=2, per_class=2, val_per_class=1))
    docs = {layout: prep.prepare(sources[layout], tmp_path / layout, sub) for layout in ("official", "hf", "kaggle")}
    trees = {layout: _tree(tmp_path / layout) for layout in docs}
    assert trees["official"] == trees["hf"] == trees["kaggle"]
    assert sorted(trees["official"]) == ["train/n01440764/n01440764_10.JPEG", "train/n01440764/n01440764_17.JPEG",
                                         "train/n01484850/n01484850_10.JPEG", "train/n01484850/n01484850_17.JPEG",
                                         "val/n01440764/ILSVRC2012_val_00000004.JPEG", "val/n01484850/ILSVRC2012_val_00000002.JPEG"]
    doc = docs["official"]
    assert doc["subset"]["name"] == "ImageNet-2 (2 train / 1 val images per class)" and doc["imagenet_1k"] is False
    info = check_layout(tmp_path / "official")
    assert info.subset == doc["subset"]["name"]
    # Counts that pass for ImageNet-1k (within its tolerance) still do not, once the data say they are a subset.
    imagenet_counts = {"num_classes": 1000, "train_images": 1_281_000, "val_images": 50_000}
    assert dataset_differences(imagenet_counts) == []
    assert dataset_differences({**imagenet_counts, "dataset_subset": info.subset}) == [
        "a subset of ImageNet-1k, not ImageNet-1k: ImageNet-2 (2 train / 1 val images per class)"]


def test_the_trainer_records_the_subset_in_derived(sources, tmp_path) -> None:
    import yaml

    from ablation import config, rundir
    from ablation.train.bookkeeping import write_config

    prep.prepare(sources["imagefolder"], tmp_path / "d", prep.Options(verify=False, workers=1, subset=prep.Subset(classes=3)))
    cfg = config.load(None, [f"data.root={tmp_path / 'd'}"])
    info = check_layout(tmp_path / "d")
    rd = rundir.RunDir(tmp_path / "run")
    rd.root.mkdir()
    write_config(rd, cfg, config.derive(cfg, 1_281_167), info)
    assert yaml.safe_load(rd.config.read_text())["derived"]["dataset_subset"] == "ImageNet-3 (all train / all val images per class)"


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file and what to do.
# ---------------------------------------------------------------------------------------------


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_truncated_archive_names_the_member_and_says_download_again(sources, tmp_path) -> None:
    src = _copy(sources["official"], tmp_path)
    train = src / inet.TRAIN_TAR
    data = train.read_bytes()
    train.write_bytes(data[: len(data) - 12000])  # the last class's inner tar cut short
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "out", NO_VERIFY)
    assert _one_line(e).startswith(f"cannot read {train}: unexpected end of data; the archive is truncated or corrupt: download it again")
    with tarfile.open(sources["official"] / inet.TRAIN_TAR) as tar:
        inner = tar.getmember("n01443537.tar")
    damaged = bytearray(data)
    damaged[inner.offset_data + 600: inner.offset_data + 1200] = b"\xff" * 600  # inside the inner tar: its first image cut
    damaged[inner.offset_data: inner.offset_data + 512] = b"\xff" * 512  # and its first header garbled
    train.write_bytes(bytes(damaged))
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "out2", NO_VERIFY)
    assert _one_line(e).startswith(f"cannot read member n01443537.tar of {train}: ")
    assert "the archive is truncated or corrupt: download it again" in str(e.value)
    assert not (tmp_path / "out" / prep.DATASET_JSON).exists()


def test_a_corrupt_member_names_the_file(sources, tmp_path) -> None:
    src = _copy(sources["official"], tmp_path)
    val = src / inet.VAL_TAR
    with tarfile.open(val) as tar:
        m = tar.getmember(inet.val_name(3))
    data = bytearray(val.read_bytes())
    data[m.offset_data: m.offset_data + 64] = b"\0" * 64  # the JPEG header zeroed: no image any more
    val.write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "out", NO_VERIFY)
    assert _one_line(e).startswith(f"{val}: {inet.val_name(3)} is not a readable image (")
    assert "it is damaged: download it again" in str(e.value)
    kaggle = _copy(sources["kaggle"], tmp_path)
    bad = kaggle / inet.KAGGLE_DATA / "train" / "n01484850" / mini.train_name("n01484850", 2)
    bad.write_bytes(b"<html>404</html>")  # a download that saved an error page
    with pytest.raises(DataError) as e:
        prep.prepare(kaggle, tmp_path / "out-kaggle", NO_VERIFY)
    assert _one_line(e).startswith(f"{bad} is not a readable image (")


def test_a_devkit_of_another_year_is_named_as_such(sources, tmp_path) -> None:
    import scipy.io

    src = _copy(sources["official"], tmp_path)
    meta = scipy.io.loadmat(__import__("io").BytesIO(mini.meta_mat(SPEC)))["synsets"]
    fields = [("ILSVRC2010_ID" if f == "ILSVRC2012_ID" else f, object) for f in meta.dtype.names]
    old = np.zeros(meta.shape, dtype=fields)
    for f_new, f_old in zip(old.dtype.names, meta.dtype.names):
        old[f_new] = meta[f_old]
    buf = __import__("io").BytesIO()
    scipy.io.savemat(buf, {"synsets": old})
    top = "ILSVRC2010_devkit-1.0"
    (src / inet.DEVKIT).write_bytes(mini.gzip_bytes(mini.tar_bytes([(f"{top}/data/meta.mat", buf.getvalue()),
                                                                     (f"{top}/data/ILSVRC2010_validation_ground_truth.txt", b"1\n")])))
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "out", NO_VERIFY)
    assert _one_line(e) == (f"{src / inet.DEVKIT}:data/meta.mat is not the ILSVRC2012 devkit's: it is from 2010 (field ILSVRC2010_ID); "
                            f"use {inet.DEVKIT}, the devkit of ImageNet-1k 2012")


def test_a_missing_validation_label_names_the_image_and_the_label_file(sources, tmp_path) -> None:
    src = _copy(sources["official"], tmp_path)
    truth = mini.ground_truth(SPEC).splitlines(keepends=True)[:-1]  # the last image's line lost
    top = "ILSVRC2012_devkit_t12"
    (src / inet.DEVKIT).write_bytes(mini.gzip_bytes(mini.tar_bytes([(f"{top}/{inet.META_MAT}", mini.meta_mat(SPEC)),
                                                                     (f"{top}/{inet.GROUND_TRUTH}", "".join(truth).encode())])))
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "out", NO_VERIFY)
    assert _one_line(e).startswith(f"validation image {inet.val_name(8)} in {src / inet.VAL_TAR} has no label in {src / inet.DEVKIT}; ")


def test_a_class_missing_from_one_split_is_named(sources, tmp_path) -> None:
    src = _copy(sources["kaggle"], tmp_path)
    shutil.rmtree(src / inet.KAGGLE_DATA / "train" / "n01484850")
    with pytest.raises(DataError) as e:
        prep.prepare(src, tmp_path / "out", NO_VERIFY)
    assert _one_line(e) == (f"class n01484850 has no train images in {src}; the source is incomplete: download its train part again")
    assert not (tmp_path / "out" / "val").exists() and not (tmp_path / "out" / prep.DATASET_JSON).exists()


def test_a_full_disk_stops_with_one_line_leaves_nothing_looking_complete_and_resumes(sources, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("ABLATION_FAULT", "prepare:write:5:enospc")  # the 5th image: data written, rename not done
    with pytest.raises(DiskFullError) as e:
        prep.prepare(sources["hf"], out, NO_VERIFY)
    assert _one_line(e).startswith("disk full writing ") and "run the same command again: it resumes" in str(e.value)
    assert not (out / prep.DATASET_JSON).exists() and not (out / "train").exists()  # no class folder moved in
    assert [p for p in out.rglob("*.tmp")] == []  # the temporary file of the failed write is gone
    assert "is an unfinished prepare" in _one_line(pytest.raises(DataError, prep.describe, out))
    monkeypatch.delenv("ABLATION_FAULT")
    from ablation import faults

    faults.reset()  # the kill test's child (forked from this process) counts its writes from zero
    doc = prep.prepare(sources["hf"], out, NO_VERIFY)
    assert _tree(out) == mini.expected_tree(SPEC) and doc["resumed_images"] == 4


def _prepare_killed_at(src: Path, out: Path, write: int) -> None:
    """In a forked child: prepare with one worker, SIGKILLed at its `write`-th image (data written, rename not done)."""
    from ablation import faults

    faults.reset()
    os.environ["ABLATION_FAULT"] = f"prepare:write:{write}:kill"
    prep.prepare(src, out, NO_VERIFY)


def test_a_prepare_killed_half_way_resumes_without_redoing_or_half_files(sources, tmp_path) -> None:
    import multiprocessing

    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_prepare_killed_at, args=(sources["official"], out, 10))
    child.start()
    child.join(120)
    assert child.exitcode == -9
    partial = out / prep.STATE / "partial"
    written = list(partial.rglob("*.JPEG"))
    assert len(written) == 9 and len(list(partial.rglob("*.tmp"))) == 1  # 9 whole images, one under its temporary name
    assert not (out / prep.DATASET_JSON).exists() and not (out / "train").exists()
    before = {out / p.relative_to(partial): p.stat().st_mtime_ns for p in written}
    doc = prep.prepare(sources["official"], out, NO_VERIFY)
    assert _tree(out) == mini.expected_tree(SPEC) and list(out.rglob("*.tmp")) == []
    assert doc["resumed_images"] == 9 and doc["train_images"] == 12
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the images written before the kill were not written again


def test_too_little_free_space_is_refused_up_front(sources, tmp_path, monkeypatch) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(prep.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))
    with pytest.raises(DataError) as e:
        prep.prepare(sources["kaggle"], tmp_path / "out", NO_VERIFY)
    assert _one_line(e).startswith(f"{tmp_path / 'out'} has 0.0 GB free, prepare needs about 0.0 GB more; free space or pick another --out")
    assert not list((tmp_path / "out").rglob("*.JPEG"))


def test_a_pool_worker_that_dies_is_one_line_and_the_prepare_resumes(sources, tmp_path, monkeypatch) -> None:
    from ablation import faults

    faults.reset()
    monkeypatch.setenv("ABLATION_FAULT", "prepare:write:2:kill")  # each forked worker's 2nd image: both workers die
    with pytest.raises(DataError) as e:
        prep.prepare(sources["official"], tmp_path / "out", prep.Options(verify=False, workers=2))
    assert "an extraction process died" in _one_line(e) and "run the same command again: it resumes" in str(e.value)
    monkeypatch.delenv("ABLATION_FAULT")
    doc = prep.prepare(sources["official"], tmp_path / "out", prep.Options(verify=False, workers=2))
    assert _tree(tmp_path / "out") == mini.expected_tree(SPEC) and doc["resumed_images"] >= 1


def test_parquet_revisions_are_named_as_unsupported(tmp_path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00294.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="parquet files: the newer Hugging Face imagenet-1k revisions"):
        inet.detect_source(tmp_path)


def test_the_command_line_says_one_line_and_exits_2_on_bad_input(sources, tmp_path) -> None:
    from conftest import subprocess_env

    r = subprocess.run([sys.executable, "-m", "ablation", "data", "prepare", "imagenet", str(tmp_path), "--out", str(tmp_path / "o")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {tmp_path} holds no ImageNet source")
    assert os.listdir(tmp_path) == []  # nothing written


def test_the_format_option_offers_what_prepare_writes() -> None:
    from ablation.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["data", "prepare", "imagenet", "SRC", "--out", "DEST"])
    assert (args.format, args.no_verify, args.classes, args.per_class, args.workers) == ("tree", False, None, None, 0)
    for name in ("data", "prepare", "imagenet"):  # down to `ablation data prepare imagenet`
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    assert tuple(next(a for a in parser._actions if a.dest == "format").choices) == prep.FORMATS


def test_the_source_facts_miniatures_and_extraction_do_not_import_torch() -> None:
    from conftest import subprocess_env

    code = "import sys, ablation.data.imagenet, ablation.data.miniature, ablation.data.extract; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=subprocess_env(), timeout=60).returncode == 0


def test_the_pool_is_sized_by_the_cpu_budget(sources, tmp_path, monkeypatch) -> None:
    from ablation.cpus import CPUS_ENV
    from ablation.data import extract

    sizes = []
    real = extract.ProcessPoolExecutor

    def recording(n, **kw):
        sizes.append(n)
        return real(n, **kw)

    monkeypatch.setattr(extract, "ProcessPoolExecutor", recording)
    monkeypatch.setenv(CPUS_ENV, "1")  # the local executor's share: one core, so no pool
    prep.prepare(sources["kaggle"], tmp_path / "one", prep.Options(verify=False))
    monkeypatch.setenv(CPUS_ENV, "2")
    prep.prepare(sources["kaggle"], tmp_path / "two", prep.Options(verify=False))
    assert sizes == [min(2, len(os.sched_getaffinity(0)))] or (sizes == [] and len(os.sched_getaffinity(0)) == 1)
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two") == mini.expected_tree(SPEC)
