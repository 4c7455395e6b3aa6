"""Per-image results (<run>/predictions/): what a run writes, that the errors it records are counted from them, that
N processes write the bytes one process standing in for N writes, that a resumed run ends with the same files, and
the one-line errors of read_predictions.

The N-process and resume equalities of whole runs are also checked wherever tests compare runs
(helpers.assert_same_run, test_trainer's four-process test).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAULT_ARGS, RUN, ablation, ablation_ok, assert_same_predictions, assert_same_run, run_folder, weights, write_run

from ablation import config, rundir
from ablation.faults import FAULT_ENV
from ablation.train.distributed import DistEnv
from ablation.train.trainer import train

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes (so top-5 is not every class) x 16 training images (6 steps of 16 per epoch), 5 validation images each."""
    from ablation.data.synth import SynthSpec, write_synth

    root = tmp_path_factory.mktemp("data") / "six"
    write_synth(root, SynthSpec(classes=6, train_per_class=16, val_per_class=5, size=16))
    return root


@pytest.fixture(scope="module")
def trained(six_classes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch tiny run's folder (one process standing in for 4 GPUs)."""
    folder = tmp_path_factory.mktemp("runs") / "run"
    assert train(config.load(None, RUN + [f"data.root={six_classes}"]), folder, DistEnv())["status"] == "ok"
    return folder


def test_a_run_records_every_images_top5_and_its_errors_are_counted_from_them(trained: Path, six_classes: Path) -> None:
    from ablation.data.layout import scan_layout
    from ablation.data.pipelines import SeededImageFolder

    d = trained / rundir.PREDICTIONS
    assert sorted(p.name for p in d.iterdir()) == ["epoch_001.npy", "epoch_002.npy", "labels.npy", "val.json"]
    assert rundir.predictions_epochs(trained) == [1, 2]
    scan = scan_layout(six_classes)
    meta = json.loads((d / "val.json").read_text())
    assert meta == {"images": 30, "classes": 6, "k": 5, "fingerprint": scan.info.fingerprint,
                    "val_fingerprint": scan.split_fingerprint("val")}
    assert meta["fingerprint"] == json.loads((trained / rundir.ENV).read_text())["data"]["fingerprint"]

    labels = np.load(d / "labels.npy", allow_pickle=False)
    assert labels.dtype == np.uint16 and labels.tolist() == SeededImageFolder(six_classes, "val", None, 0).targets  # dataset order
    rows = rundir.read_jsonl(trained / rundir.METRICS)
    for row in rows:
        top = np.load(d / rundir.predictions_file(row["epoch"]), allow_pickle=False)
        assert top.dtype == np.uint16 and top.shape == (30, 5)
        assert all(len(set(r)) == 5 for r in top.tolist()) and top.max() < 6  # five distinct classes per image
        # The recorded errors are counted from these very predictions, with the same arithmetic: equal, not close.
        hit1, hit5 = float((top[:, 0] == labels).sum()), float((top == labels[:, None]).any(1).sum())
        assert (row["val_err1"], row["val_err5"]) == (100.0 * (1 - hit1 / 30), 100.0 * (1 - hit5 / 30))

    labels2, top2, epoch, meta2 = rundir.read_predictions(trained)
    assert epoch == 2 and meta2 == meta and np.array_equal(labels2, labels)
    assert np.array_equal(top2, np.load(d / "epoch_002.npy")) and rundir.read_predictions(trained, 1)[2] == 1


def test_the_topk_file_is_the_models_own_ranking(trained: Path, six_classes: Path) -> None:
    """The last epoch's rows are the checkpointed model's top-5 logits of each validation image, in the dataset's order."""
    from ablation.data.pipelines import SeededImageFolder, pipeline_transforms
    from ablation.train.loaders import eval_data_cfg
    from ablation.train.models import create_model

    cfg = config.normalized(config.load(None, RUN + [f"data.root={six_classes}"]))
    model = create_model(cfg, 6, gpus_per_process=4)
    model.load_state_dict(weights(trained))
    model.eval()
    _, val_tf = pipeline_transforms(eval_data_cfg(cfg, config.derive(cfg, 96)))
    ds = SeededImageFolder(six_classes, "val", val_tf, cfg.seed)
    with torch.no_grad():
        logits = model(torch.stack([ds[i][0] for i in range(len(ds))]))
    assert np.array_equal(rundir.read_predictions(trained)[1], logits.topk(5, dim=1).indices.numpy().astype(np.uint16))


def test_read_predictions_says_in_one_line_what_is_missing_or_damaged(tmp_path: Path) -> None:
    old = write_run(tmp_path, ["norm.name=gn"], [30.0, 25.0])["folder"]  # a folder from before per-image results
    for call in (lambda: rundir.read_predictions(old), lambda: rundir.read_predictions(old, 2)):
        with pytest.raises(rundir.NoPredictions) as e:
            call()
        assert str(e.value) == (f"{old}: no per-image results (run trained before they were recorded in predictions/); "
                                "retrain it in a new results folder to compare it image by image")
    assert isinstance(e.value, rundir.AblationError) and rundir.predictions_epochs(old) == []
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    with pytest.raises(rundir.NoPredictions, match=r"fresh: no per-image results yet \(no epoch evaluated\)"):
        rundir.read_predictions(fresh)

    run = tmp_path / "run"
    labels = np.array([0, 2, 1, 2], dtype=np.uint16)
    meta = {"images": 4, "classes": 3, "k": 3, "fingerprint": "f", "val_fingerprint": "v"}
    tops = {e: np.array([[(i + e) % 3, (i + e + 1) % 3, (i + e + 2) % 3] for i in range(4)], dtype=np.uint16) for e in (1, 2, 3, 5)}
    for e, top in tops.items():
        rundir.write_predictions(run, e, top, labels, meta)
    (run / rundir.PREDICTIONS / "epoch_7.npy").write_bytes(b"")  # not one of ours: not an epoch
    assert rundir.predictions_epochs(run) == [1, 2, 3, 5]
    got = rundir.read_predictions(run)
    assert got[2] == 5 and np.array_equal(got[1], tops[5]) and np.array_equal(got[0], labels) and got[3] == meta
    with pytest.raises(rundir.NoPredictions, match=r"run: no per-image results for epoch 4 \(predictions/ holds epochs 1-3, 5\)$"):
        rundir.read_predictions(run, 4)

    def damaged(name: str, data: bytes) -> str:
        """read_predictions' error with predictions/<name> holding data (the file restored after)."""
        path = run / rundir.PREDICTIONS / name
        good = path.read_bytes()
        path.write_bytes(data)
        try:
            with pytest.raises(rundir.CorruptFile) as e:
                rundir.read_predictions(run, 3)
        finally:
            path.write_bytes(good)
        assert len(str(e.value).splitlines()) == 1 and str(path) in str(e.value)
        return str(e.value)

    epoch3 = (run / rundir.PREDICTIONS / "epoch_003.npy").read_bytes()
    assert "is cut or garbled (EOF: reading array data" in damaged("epoch_003.npy", epoch3[:-5])  # a truncated file
    assert "is cut or garbled" in damaged("epoch_003.npy", epoch3[:50])  # cut inside the header
    assert damaged("epoch_003.npy", b"").endswith("is not a numpy .npy file (0 bytes, empty)")
    assert damaged("epoch_003.npy", b"garbage" * 20).endswith("is not a numpy .npy file (140 bytes, no .npy header)")
    assert "holds int64 [4, 3], not uint16 [4, 3]" in damaged("epoch_003.npy", rundir.npy_bytes(tops[3].astype(np.int64)))
    assert "holds uint16 [4], not uint16 [4, 3]" in damaged("epoch_003.npy", rundir.npy_bytes(labels))
    assert "holds class 9, beyond the 3 classes" in damaged("labels.npy", rundir.npy_bytes(labels + 7))
    assert "is not valid JSON" in damaged("val.json", b'{"images": 4')
    assert "does not give images, classes and k as positive integers" in damaged("val.json", b'{"images": "4"}')
    (run / rundir.PREDICTIONS / "labels.npy").unlink()
    with pytest.raises(rundir.CorruptFile, match=r"labels.npy is missing"):
        rundir.read_predictions(run)

    # A start resuming from epoch 2's checkpoint removes the results of the epochs it trains again; the rest stay.
    rundir.prune_predictions(run, 2)
    assert rundir.predictions_epochs(run) == [1, 2]
    with pytest.raises(ValueError, match="uint16"):
        rundir.write_predictions(run, 1, tops[1].astype(np.int32), labels, meta)


def test_old_run_folders_still_read_through_status_and_the_report(tmp_path: Path) -> None:
    """Nothing that reads a run folder today needs predictions/: a folder without it collects as before."""
    from ablation.results import collect
    from ablation.sweep import status

    folder = write_run(tmp_path, ["norm.name=gn"], [30.0, 25.0, 24.0])["folder"]
    assert status.run_state(folder, 3, None, None)[:2] == ("ok", 3)
    runs, _ = collect.collect([tmp_path])
    assert len(runs) == 1 and list(runs["status"]) == ["ok"]


# ---------------------------------------------------------------------------------------------- N processes


def _gather_worker(out: Path) -> None:
    """One process of test_gather_puts_every_process_rows_back_in_dataset_order (torchrun --nproc_per_node 3)."""
    from ablation.train.distributed import setup, teardown
    from ablation.train.loaders import val_shard
    from ablation.train.loop import gather_topk

    env = setup("cpu")
    for n in (10, 9, 3, 2, 1):  # shards of unequal length, and processes with no image at all
        shard = val_shard(n, env)
        top = _rows(torch.tensor(list(shard), dtype=torch.int64)) if len(shard) else None  # evaluate's: None for no batch
        rows = gather_topk(top, env, n, 5)
        if env.is_main:
            (out / f"{n}.npy").write_bytes(rundir.npy_bytes(rows))
        else:
            assert rows is None
    teardown()


def _rows(images: torch.Tensor) -> torch.Tensor:
    """Top-5 rows that name their image: image i 'predicts' 7i, 7i + 1000, ... 7i + 4000 (mod 60000: uint16)."""
    return (images[:, None] * 7 + torch.arange(5) * 1000) % 60000


@pytest.mark.slow
def test_gather_puts_every_process_rows_back_in_dataset_order(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """3 processes, each holding the rows of its shard (images r, r + 3, ...), give rank 0 the very array (bytes) that one
    process holding every row gives, whatever divides what."""
    import subprocess

    from ablation.train.loop import gather_topk

    proc = subprocess.run([*TORCHRUN, "3", __file__, str(tmp_path)], env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n in (10, 9, 3, 2, 1):
        one = gather_topk(_rows(torch.arange(n)), DistEnv(), n, 5)
        assert one.dtype == np.uint16 and one.shape == (n, 5) and one[:, 0].tolist() == [7 * i for i in range(n)]
        assert (tmp_path / f"{n}.npy").read_bytes() == rundir.npy_bytes(one), n


@pytest.mark.slow
def test_four_processes_write_the_bytes_one_process_standing_in_for_four_writes(tiny_data: Path, tmp_path: Path,
                                                                                cli_env: dict[str, str]) -> None:
    """End to end through torchrun: with a learning rate that is 0 in float32 (no weight moves), 4 processes and one standing in for
    them evaluate the same model, each process its shard: predictions/ is the same, byte for byte. (With a real learning
    rate the weights of the two agree to 1e-4 only: test_trainer's four-process test allows one flipped image there.)"""
    args = ["train", *RUN, "epochs=1", "norm.name=gn", "norm.groups=4", "optim.lr=1e-50", f"data.root={tiny_data}"]
    multi = run_folder(ablation_ok([*args, "--results", str(tmp_path / "multi")], cli_env, ranks=4))
    single = run_folder(ablation_ok([*args, "--results", str(tmp_path / "single")], cli_env))
    assert json.loads((multi / rundir.ENV).read_text())["processes"] == 4
    wm, ws = weights(multi), weights(single)
    assert all(torch.equal(wm[k], ws[k]) for k in wm)  # the premise: the same model
    assert assert_same_predictions(multi, single) == ["epoch_001.npy", "labels.npy", "val.json"]


# ---------------------------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_an_epoch_evaluated_again_after_a_kill_rewrites_the_same_bytes(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Killed after epoch 1's results were written but before its checkpoint: the folder holds an epoch metrics.jsonl does
    not list yet; the next start removes it, trains the end of the epoch again and writes the same bytes; the run ends
    as an uninterrupted one, predictions/ included."""
    args = [*FAULT_ARGS, "epochs=2", f"data.root={tiny_data}"]  # checkpoints at steps 5, 10, 12 (epoch 1's end) ...
    whole = run_folder(ablation_ok([*args, "--results", str(tmp_path / "whole")], cli_env))
    proc = ablation([*args, "--results", str(tmp_path / "resumed")], {**cli_env, FAULT_ENV: "write:checkpoint.pt:3:kill"})
    assert proc.returncode == -9, proc.stderr
    folder = tmp_path / "resumed" / whole.name
    assert rundir.predictions_epochs(folder) == [1] and rundir.read_jsonl(folder / rundir.METRICS) == []
    first = (folder / rundir.PREDICTIONS / "epoch_001.npy").read_bytes()
    resumed = run_folder(ablation_ok([*args, "--results", str(tmp_path / "resumed")], cli_env))
    starts = json.loads((resumed / rundir.ENV).read_text())["starts"]
    assert [s["resumed_from_step"] for s in starts] == [0, 10]
    assert (resumed / rundir.PREDICTIONS / "epoch_001.npy").read_bytes() == first
    assert_same_run(whole, resumed)  # predictions/ included, byte for byte
    assert assert_same_predictions(whole, resumed) == ["epoch_001.npy", "epoch_002.npy", "labels.npy", "val.json"]


if __name__ == "__main__":  # torchrun runs this file as the gather test's worker
    _gather_worker(Path(sys.argv[1]))
