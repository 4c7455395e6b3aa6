"""Reading ImageNet in place (issue 18, points 2 and 3): the archive index, tar shards, reads by offset, and a run on the
archives that equals the run on the extracted tree bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from helpers import RUN, ablation_ok, metrics_without_time, predictions, run_folder, split_cfg, weights

from ablation.cli import main
from ablation.data import archives, members, miniature
from ablation.data.layout import check_splits, load_rgb, scan_layout
from ablation.data.members import Member, read_source
from ablation.data.shards import write_shards
from ablation.errors import DataError

# 4 classes x 8 train images = 32 (2 steps of RUN's global batch 16 per epoch), 2 val images per class;
# the miniature's train set holds a CMYK JPEG and a PNG named .JPEG, and its devkit's ID order is not the wnid order.
SPEC = miniature.MiniSpec(classes=4, train_per_class=8, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """The same images as an extracted tree, as the official archives (indexed) and as tar shards of the tree."""
    base = tmp_path_factory.mktemp("inplace")
    miniature.write_miniature(base / "tree", "imagefolder", SPEC)
    miniature.write_miniature(base / "official", "official", SPEC)
    archives.write_index(base / "official")
    write_shards(base / "tree", base / "shards", shard_bytes=20_000)  # several shards per split
    return {"tree": base / "tree", "official": base / "official", "shards": base / "shards"}


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`ablation ARGS` in this process (the subprocess start costs more than these commands): (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, copy_function=shutil.copy2)  # copy2 keeps the mtimes the index records
    return dest


@pytest.mark.parametrize("kind", ["official", "shards"])
def test_an_archive_folder_scans_to_its_tree_classes_order_labels_and_bytes(kind: str, sources: dict[str, Path]) -> None:
    tree, arch = scan_layout(sources["tree"]), scan_layout(sources[kind])
    assert arch.info.layout == {"official": archives.OFFICIAL, "shards": archives.SHARDS}[kind]
    assert (arch.info.classes, arch.info.train_images, arch.info.val_images) == (tree.info.classes, 32, 8)
    assert arch.info.fingerprint == tree.info.fingerprint  # content-free: names and classes, whichever layout holds them
    assert arch.files == tree.files and arch.split_fingerprint("val") == tree.split_fingerprint("val")
    for split in ("train", "val"):
        got, want = arch.samples(split), tree.samples(split)
        assert [t for _, t in got] == [t for _, t in want]
        assert all(isinstance(m, Member) for m, _ in got)
        assert [read_source(m) for m, _ in got] == [Path(p).read_bytes() for p, _ in want]
    # the validation labels come from the devkit by wnid: image k's class is the wnid the miniature gave it
    val_wnids = miniature.val_wnids(SPEC)
    labels = {m.name: arch.info.classes[t] for m, t in arch.samples("val")}
    if kind == "official":
        assert labels == {f"ILSVRC2012_val_{k:08d}.JPEG": w for k, w in enumerate(val_wnids, start=1)}


@pytest.mark.parametrize("pipeline", ["split", "device-decode"])
def test_the_pipelines_that_read_bytes_give_the_trees_samples_from_archives(pipeline: str, sources: dict[str, Path]) -> None:
    import torch

    from ablation.data.pipelines import SeededImageFolder, pipeline_transforms

    train_tf, val_tf = pipeline_transforms(split_cfg(pipeline=pipeline))
    for split, tf in (("train", train_tf), ("val", val_tf)):
        tree = SeededImageFolder(sources["tree"], split, tf, seed=3)
        arch = SeededImageFolder(sources["official"], split, tf, seed=3)  # scanned from its index
        assert len(arch) == len(tree) and arch.targets == tree.targets
        for i in range(len(tree)):  # the CMYK JPEG and the PNG named .JPEG among them
            (a, ya), (b, yb) = arch[i], tree[i]
            assert ya == yb
            a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
            assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else all(map(torch.equal, x, y)) for x, y in zip(a, b))


def test_tar_shards_are_deterministic_named_by_class_in_sample_order(sources: dict[str, Path], tmp_path: Path) -> None:
    shards = sorted(p.name for p in sources["shards"].glob("*.tar"))
    assert len([s for s in shards if s.startswith("train-")]) > 1 and "val-000000.tar" in shards
    again = tmp_path / "again"
    write_shards(sources["tree"], again, shard_bytes=20_000)
    for name in shards:  # the same tree writes the same bytes
        assert (again / name).read_bytes() == (sources["shards"] / name).read_bytes()
    names = []
    for name in sorted(n for n in shards if n.startswith("train-")):
        with tarfile.open(again / name) as tar:
            names += [m.name for m in tar]
            assert {m.mtime for m in tar} == {0}
    tree = scan_layout(sources["tree"])
    assert names == [f"{c}/{f}" for c, files in zip(tree.info.classes, tree.files["train"]) for f in files]
    # sharded again in one shard a split, the finer sharding's other shards go: the folder reads as the tree still
    write_shards(sources["tree"], again)
    assert sorted(p.name for p in again.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    assert scan_layout(again).files == tree.files
    (again / "train").mkdir()
    (again / "val").mkdir()
    assert archives.archive_kind(again) is None  # a tree extracted beside its archives reads as the tree it is


def test_in_place_runs_equal_the_extracted_run_bit_for_bit(sources: dict[str, Path], tmp_path: Path, cli_env: dict[str, str]) -> None:
    folders = {}
    for kind in ("tree", "official", "shards"):
        workers = ["data.workers=2"] if kind != "tree" else []  # loader workers open their own archive handles
        proc = ablation_ok(["train", *RUN, *workers, f"data.root={sources[kind]}", "--results", str(tmp_path / kind)], cli_env)
        folders[kind] = run_folder(proc)
    tree = folders["tree"]
    for kind in ("official", "shards"):
        folder = folders[kind]
        assert folder.name == tree.name  # data.root is not hashed: the same images, the same run id
        assert metrics_without_time(folder) == metrics_without_time(tree)
        w, ref = weights(folder), weights(tree)
        assert w.keys() == ref.keys() and all(w[k].equal(ref[k]) for k in ref)
        assert predictions(folder) == predictions(tree) and predictions(tree)
        env, tree_env = (json.loads((f / "env.json").read_text())["data"] for f in (folder, tree))
        assert env["layout"] == {"official": archives.OFFICIAL, "shards": archives.SHARDS}[kind] and tree_env["layout"] == "imagefolder"
        assert env["fingerprint"] == tree_env["fingerprint"]


def test_a_changed_archive_is_detected_and_the_user_told_to_reindex(sources: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(sources["official"], tmp_path / "official")
    assert scan_layout(root).info.layout == archives.OFFICIAL  # copied with its mtimes: the index still holds
    val = root / archives.VAL_TAR
    st = val.stat()
    os.utime(val, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced by another download, same size
    code, _, err = cli(["data", "check", str(root)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert f"archive {val} changed since index" in err and f"ablation data index {root}" in err
    code, out, _ = cli(["data", "index", str(root)], capsys)
    assert code == 0 and "4 classes, 32 train / 8 val images" in out
    assert "ilsvrc2012-archives, read in place" in cli(["data", "check", str(root)], capsys)[1]
    val.unlink()
    with pytest.raises(DataError, match=f"archive folder {root} lacks {archives.VAL_TAR}"):
        check_splits(root)  # what a sweep checks before it submits


def test_the_index_is_built_on_first_use_or_read_from_a_cache_folder(
        sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(sources["shards"], tmp_path / "shards")
    (root / archives.INDEX_NAME).unlink()
    cache = tmp_path / "cache"
    monkeypatch.setenv("ABLATION_INDEX_CACHE", str(tmp_path / "elsewhere"))
    code, out, _ = cli(["data", "index", str(root), "--cache", str(cache)], capsys)
    written = archives.index_path(root, cache)
    assert code == 0 and written.is_file() and not (root / archives.INDEX_NAME).exists() and f"ABLATION_INDEX_CACHE={cache}" in out
    monkeypatch.setenv("ABLATION_INDEX_CACHE", str(cache))
    assert archives.find_index(root) == written and scan_layout(root).info.train_images == 32
    monkeypatch.setenv("ABLATION_INDEX_CACHE", str(tmp_path / "empty-cache"))
    heard: list[str] = []
    assert scan_layout(root, heard.append).info.train_images == 32  # no index found: built beside the shards
    assert (root / archives.INDEX_NAME).is_file() and len(heard) == 2 and str(root / archives.INDEX_NAME) in heard[1]


def test_a_truncated_archive_is_one_line_naming_it(sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(sources["official"], tmp_path / "official")
    (root / archives.INDEX_NAME).unlink()
    train = root / archives.TRAIN_TAR
    with open(train, "r+b") as f:
        f.truncate(train.stat().st_size // 2)  # the download stopped half-way
    code, _, err = cli(["data", "index", str(root)], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert str(train) in err and "truncated" in err and "download it again" in err
    assert not (root / archives.INDEX_NAME).exists()
    # an index entry past the end of its archive (read by offset): one line, not a short image
    short = Member(str(train), train.stat().st_size - 10, 100, "n01440764.tar/n01440764_7.JPEG")
    with pytest.raises(DataError, match=r"ends inside member n01440764.tar/n01440764_7.JPEG .* truncated"):
        read_source(short)


def test_a_corrupt_member_is_one_line_naming_the_archive_and_member(sources: dict[str, Path], tmp_path: Path) -> None:
    root = _copy(sources["shards"], tmp_path / "shards")
    scan = scan_layout(root)
    victim, _ = scan.samples("train")[3]
    path = Path(victim.archive)
    st = path.stat()
    with open(path, "r+b") as f:  # the member's bytes overwritten in place: same size, and the mtime put back
        f.seek(victim.offset)
        f.write(b"\0" * victim.size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match=f"cannot read image {path}:{victim.name}: .*archive is damaged") as err:
        load_rgb(scan_layout(root).samples("train")[3][0])
    assert "\n" not in str(err.value)


def test_a_validation_file_the_devkit_does_not_label_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "official"
    tree = miniature.write_miniature(root, "official", SPEC)
    val = sorted((rel.split("/")[-1], data) for rel, data in tree.items() if rel.startswith("val/"))
    val.append(("ILSVRC2012_val_00000099.JPEG", val[0][1]))  # one file more than the ground truth lists
    (root / archives.VAL_TAR).write_bytes(miniature.tar_bytes(val))
    with pytest.raises(DataError, match=r"has no label for ILSVRC2012_img_val.tar:ILSVRC2012_val_00000099.JPEG; use the devkit"):
        archives.write_index(root)
    assert not (root / archives.INDEX_NAME).exists()  # nothing half-written


def test_a_loader_worker_opens_its_own_handles(sources: dict[str, Path]) -> None:
    m, _ = scan_layout(sources["shards"]).samples("train")[0]
    data = read_source(m)
    assert m.archive in members.open_archives()  # this process's descriptor, opened on first use
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no inherited handle; its own, opened when it reads
        try:
            inherited = m.archive in members.open_archives()
            ok = read_source(m) == data and m.archive in members.open_archives()
            os.write(w, b"%d%d" % (inherited, ok))
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 2) == b"01"
    os.close(r)


def test_data_bench_reads_an_archive_folder(sources: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from ablation.data import bench

    code, out, _ = cli(["data", "bench", str(sources["official"]), "data.image_size=16", "--images", "6"], capsys)
    assert code == 0 and "6 training images of" in out and "read only (archive members)" in out
    picked, tree = bench.pick_images(sources["official"], 6), bench.pick_images(sources["tree"], 6)
    assert picked.info.classes == tree.info.classes and picked.files == tree.files  # the same images, from the archives
    assert [read_source(m) for m, _ in picked.samples("train")] == [Path(p).read_bytes() for p, _ in tree.samples("train")]


def test_prepare_format_tar_writes_the_prepared_tree_as_indexed_shards(sources: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from ablation.data import prepare

    kaggle = tmp_path / "kaggle"
    miniature.write_miniature(kaggle, "kaggle", SPEC)
    args = ["data", "prepare", "imagenet", str(kaggle), "--no-verify", "--classes", "2", "--format"]
    code, _, err = cli([*args, "tar", "--out", str(tmp_path / "shards")], capsys)
    assert code == 0, err
    code, _, err = cli([*args, "tree", "--out", str(tmp_path / "tree")], capsys)
    assert code == 0, err
    shards, tree = scan_layout(tmp_path / "shards"), scan_layout(tmp_path / "tree")
    assert shards.info.layout == archives.SHARDS and not (tmp_path / "shards" / prepare.STAGING).exists()
    assert shards.files == tree.files and shards.info.fingerprint == tree.info.fingerprint
    assert shards.info.subset == tree.info.subset == "ImageNet-2 (all train / all val images per class)"  # never taken for ImageNet-1k
    assert [read_source(m) for m, _ in shards.samples("val")] == [Path(p).read_bytes() for p, _ in tree.samples("val")]
    doc = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert doc["format"] == "tar" and doc["shards"] == ["train-000000.tar", "val-000000.tar"]
    assert doc["fingerprint"] == tree.info.fingerprint
    assert cli([*args, "tar", "--out", str(tmp_path / "shards")], capsys)[0] == 0  # done already: nothing to redo
    resharded = tmp_path / "resharded"  # `ablation data shard` of the prepared subset keeps its record: still a subset
    assert cli(["data", "shard", str(tmp_path / "tree"), "--out", str(resharded)], capsys)[0] == 0
    assert scan_layout(resharded).info.subset == tree.info.subset and scan_layout(resharded).files == tree.files
    code, _, err = cli([*args, "tree", "--out", str(tmp_path / "shards")], capsys)  # another format into it: refused
    assert code != 0 and "already holds a prepared dataset" in err


@pytest.mark.parametrize("missing", ["train class", "val file"])
def test_a_member_missing_from_an_official_archive_is_one_line(missing: str, tmp_path: Path) -> None:
    root = tmp_path / "official"
    tree = miniature.write_miniature(root, "official", SPEC)
    if missing == "train class":  # the outer tar without the last class's inner tar
        with tarfile.open(root / archives.TRAIN_TAR) as tar:
            inner = [(m.name, tar.extractfile(m).read()) for m in tar][:-1]
        (root / archives.TRAIN_TAR).write_bytes(miniature.tar_bytes(inner))
        expect = rf"{archives.TRAIN_TAR} lacks the per-class tar of 1 of the devkit's 4 classes \({miniature.wnids(SPEC)[-1]}.tar\)"
    else:  # the val tar without image 3, which the devkit labels
        val = sorted((rel.split("/")[-1], data) for rel, data in tree.items() if rel.startswith("val/"))
        (root / archives.VAL_TAR).write_bytes(miniature.tar_bytes([v for v in val if v[0] != "ILSVRC2012_val_00000003.JPEG"]))
        expect = rf"{archives.VAL_TAR} lacks 1 of the 8 validation files {archives.DEVKIT} labels \(ILSVRC2012_val_00000003.JPEG\)"
    with pytest.raises(DataError, match=expect + ".*download it again"):
        archives.write_index(root)
    assert not (root / archives.INDEX_NAME).exists()


def test_a_class_missing_from_one_split_of_the_shards_is_one_line(sources: dict[str, Path], tmp_path: Path) -> None:
    jpeg = next((sources["tree"] / "train").rglob("*.JPEG")).read_bytes()
    root = tmp_path / "shards"
    root.mkdir()
    (root / "train-000000.tar").write_bytes(miniature.tar_bytes([("n01/a.JPEG", jpeg), ("n02/b.JPEG", jpeg)]))
    (root / "val-000000.tar").write_bytes(miniature.tar_bytes([("n01/c.JPEG", jpeg)]))
    with pytest.raises(DataError, match=rf"the train and val archives of {root} hold different classes \(missing in val: n02\)"):
        scan_layout(root)
    (root / "val-000000.tar").write_bytes(miniature.tar_bytes([("c.JPEG", jpeg)]))  # not <class>/<file>
    with pytest.raises(DataError, match=r"val-000000.tar holds c.JPEG, not <class>/<file>"):
        archives.write_index(root)


def test_prepare_format_tar_stopped_while_sharding_finishes_when_run_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ablation import faults
    from ablation.data import prepare

    src, out = tmp_path / "src", tmp_path / "out"
    miniature.write_miniature(src, "imagefolder", SPEC)
    opts = prepare.Options(verify=False, workers=1, fmt="tar")
    monkeypatch.setenv(faults.FAULT_ENV, "write:val-000000.tar:1:raise")  # the val shard written, not yet renamed
    faults.reset()
    with pytest.raises(RuntimeError):
        prepare.prepare(src, out, opts)
    assert (out / "train-000000.tar").is_file() and not (out / "val-000000.tar").exists() and not (out / "dataset.json").exists()
    monkeypatch.delenv(faults.FAULT_ENV)
    faults.reset()
    doc = prepare.prepare(src, out, opts)  # the same command again: it finishes
    assert doc["format"] == "tar" and (out / "dataset.json").is_file() and not (out / prepare.STAGING).exists()
    assert scan_layout(out).files == scan_layout(src).files
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
