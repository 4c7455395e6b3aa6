"""Live curves (tracking=tensorboard | wandb): the event file read back equals metrics.jsonl, across kills and resumes;
the run id ignores tracking; wandb through a stand-in module; a missing package is one line."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import FAULT_ARGS, ROOT, RUN, ablation, ablation_ok, run_folder

from ablation import config, rundir
from ablation.config import ConfigError
from ablation.faults import FAULT_ENV
from ablation.train import tracking

TB = "tracking=tensorboard"
MISSING_TB = "error: tracking=tensorboard needs the tensorboard package: pip install 'ablation[tensorboard]'"
MISSING_WANDB = "error: tracking=wandb needs the wandb package: pip install 'ablation[wandb]'"


def read_back(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run's tb/ as TensorBoard's EventAccumulator reads it: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / rundir.TENSORBOARD))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as the curves must show it: tag -> [(epoch, value as float32, what an event holds)]."""
    rows = rundir.read_jsonl(folder / rundir.METRICS)
    return {tag: [(r["epoch"], float(np.float32(r[key]))) for r in rows] for key, tag in tracking.TAGS.items()}


def raw_steps(folder: Path, tag: str) -> list[int]:
    """The steps of one tag in every event file of tb/, in file order, nothing dropped: what the readers sort out."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in sorted((folder / rundir.TENSORBOARD).iterdir()):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def test_tracking_is_recorded_but_not_in_the_run_id(tmp_path: Path) -> None:
    off = config.load(None, RUN)
    for value in ("tensorboard", "wandb", "off"):
        cfg = config.load(None, RUN + [f"tracking={value}"])
        assert cfg.tracking == value and config.run_id(cfg) == config.run_id(off) and config.config_hash(cfg) == config.config_hash(off)
    assert config.load(None, ["tracking=false"]).tracking == "off"  # YAML's off/false read as the word
    assert config.from_dict(config.to_dict(config.load(None, [TB]))).tracking == "tensorboard"  # config.yaml keeps it
    with pytest.raises(ConfigError, match=r"^tracking must be one of off, tensorboard, wandb; got 'tb'$"):
        config.load(None, ["tracking=tb"])
    assert set(tracking.TAGS) == set(rundir.METRIC_KEYS) - {"epoch"}  # every metrics.jsonl value has a curve


def test_tensorboard_event_file_reads_back_as_metrics_jsonl(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    folder = run_folder(ablation_ok(["train", *RUN, f"data.root={tiny_data}", TB, "--results", str(tmp_path)], cli_env))
    assert folder.name == config.run_id(config.load(None, RUN + [f"data.root={tiny_data}"]))  # the run id of tracking=off
    assert yaml.safe_load((folder / rundir.CONFIG).read_text())["tracking"] == "tensorboard"
    curves = read_back(folder)
    for tag, points in curves.items():
        print(f"{tag:22s} {points}")
    assert curves == expected(folder)
    assert [step for step, _ in curves["val/err1"]] == [1, 2]


@pytest.mark.slow
def test_killed_and_resumed_run_shows_each_epoch_once(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A start without tracking killed in epoch 2; a start with it killed in epoch 3 (epoch 2 shown, then redone
    from step 25); a last one that finishes: one point per epoch, equal to metrics.jsonl, though the event files
    hold epochs 1 and 2 twice."""
    args = [*FAULT_ARGS, f"data.root={tiny_data}", "--results", str(tmp_path)]  # 3 epochs of 12 steps, checkpoints every 5
    assert ablation(args, {**cli_env, FAULT_ENV: "step:18:kill"}).returncode == -9  # last checkpoint: step 15
    folder = tmp_path / config.run_id(config.load(None, FAULT_ARGS[1:] + [f"data.root={tiny_data}"]))
    assert not (folder / rundir.TENSORBOARD).exists()
    assert ablation([*args, TB], {**cli_env, FAULT_ENV: "step:30:kill"}).returncode == -9  # last checkpoint: step 25
    assert raw_steps(folder, "val/err1") == [1, 2]  # a run that turns tracking on when resumed shows its earlier epochs
    assert run_folder(ablation_ok([*args, TB], cli_env)) == folder

    starts = json.loads((folder / rundir.ENV).read_text())["starts"]
    assert [s["resumed_from_step"] for s in starts] == [0, 15, 25]
    assert raw_steps(folder, "val/err1") == [1, 2, 1, 2, 3]  # each start rewrites the history ...
    curves = read_back(folder)
    assert curves == expected(folder)  # ... behind its restart marker, so a reader keeps each epoch once
    assert [step for step, _ in curves["train/loss"]] == [1, 2, 3]


class FakeRun:
    """What the trainer uses of a wandb run, recorded."""

    def __init__(self, summary: dict) -> None:
        self.summary = summary  # a resumed online run's comes from the server
        self.logged: list[dict] = []
        self.metrics: list[tuple[str, str | None]] = []
        self.finished: list[int] = []

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        self.metrics.append((name, step_metric))

    def log(self, data: dict) -> None:
        self.logged.append(dict(data))

    def finish(self, exit_code: int = 0) -> None:
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A stand-in `wandb` module: init's keyword arguments and the runs it returned."""
    record = types.SimpleNamespace(inits=[], runs=[], summary={})

    def init(**kwargs: object) -> FakeRun:
        record.inits.append(kwargs)
        record.runs.append(FakeRun(dict(record.summary)))
        return record.runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    for var in ("WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    return record


# A stand-in `wandb` for a training subprocess: every call, as a JSON line, in $FAKE_WANDB_LOG.
FAKE_WANDB = """
import json, os


def _note(*call):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(call) + "\\n")


class Run:
    summary = {}

    def define_metric(self, name, step_metric=None):
        _note("define_metric", name, step_metric)

    def log(self, data):
        _note("log", data)

    def finish(self, exit_code=0):
        _note("finish", exit_code)


def init(**kwargs):
    _note("init", kwargs)
    return Run()
"""


def test_wandb_run_is_offline_named_by_the_run_id_and_logs_metrics_jsonl(tiny_data: Path, tmp_path: Path,
                                                                         cli_env: dict[str, str]) -> None:
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb-calls.jsonl"
    env = {k: v for k, v in cli_env.items() if k not in ("WANDB_MODE", "WANDB_PROJECT")}
    env.update(PYTHONPATH=f"{tmp_path / 'fake'}:{cli_env['PYTHONPATH']}", FAKE_WANDB_LOG=str(log))
    folder = run_folder(ablation_ok(["train", *RUN, f"data.root={tiny_data}", "tracking=wandb", "--results", str(tmp_path / "runs")], env))
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    (_, init), *rest = calls
    rid = folder.name
    assert rid == config.run_id(config.load(None, RUN + [f"data.root={tiny_data}"]))
    assert init["name"] == rid and init["id"].startswith(rid + "-") and init["id"] == tracking.wandb_id(rundir.RunDir(folder), rid)
    assert (init["resume"], init["mode"], init["project"], init["dir"]) == ("allow", "offline", "ablation", str(folder))
    assert init["config"]["norm"]["name"] == "bn" and init["config"]["tracking"] == "wandb"
    assert ["define_metric", "epoch", None] in rest and ["define_metric", "val/err1", "epoch"] in rest
    rows = rundir.read_jsonl(folder / rundir.METRICS)
    assert [c[1] for c in rest if c[0] == "log"] == [{"epoch": r["epoch"], **{tag: r[key] for key, tag in tracking.TAGS.items()}}
                                                     for r in rows]
    assert rest[-1] == ["finish", 0]


def test_wandb_keeps_one_run_per_folder_and_the_users_mode(fake_wandb, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every start of a folder continues one wandb run, sending the checkpointed epochs that run lacks (offline: all of
    them; online: those after the server's last); a folder trained again from scratch is another run; WANDB_MODE and
    WANDB_PROJECT, when set, win."""
    cfg = config.load(None, RUN + ["tracking=wandb", "epochs=3"])
    rid = config.run_id(cfg)
    rd = rundir.RunDir(tmp_path / rid)
    first_start = {"time": "2026-01-01T00:00:00+00:00", "host": "node1"}
    rundir.write_json(rd.env, {"starts": [first_start]})
    history = [{"epoch": e, **dict.fromkeys(rundir.METRIC_KEYS[1:], float(e))} for e in (1, 2)]
    offline = tracking.open_tracker(cfg, rd, rid, history, is_main=True)  # a resumed start, offline: a new local run
    offline.epoch({**history[0], "epoch": 3})
    offline.close()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_PROJECT", "gn-ablation")
    fake_wandb.summary = {"epoch": 1}  # the server's run has epoch 1
    rundir.write_json(rd.env, {"starts": [first_start, {"time": "2026-01-02T00:00:00+00:00", "host": "node2"}]})
    online = tracking.open_tracker(cfg, rd, rid, history, is_main=True)
    online.epoch({**history[0], "epoch": 3})
    online.close(failed=True)
    a, b = fake_wandb.inits
    assert a["id"] == b["id"] and (a["mode"], b["mode"], a["project"], b["project"]) == ("offline", "online", "ablation", "gn-ablation")
    assert [row["epoch"] for row in offline.run.logged] == [1, 2, 3] and offline.run.finished == [0]
    assert [row["epoch"] for row in online.run.logged] == [2, 3] and online.run.finished == [1]
    assert offline.run.logged[0] == {"epoch": 1, **dict.fromkeys(tracking.TAGS.values(), 1.0)}
    rundir.write_json(rd.env, {"starts": [{"time": "2026-02-01T00:00:00+00:00", "host": "node1"}]})  # trained again
    assert tracking.wandb_id(rd, rid) != a["id"]
    # Another rank, or tracking off: no tracker at all.
    assert type(tracking.open_tracker(cfg, rd, rid, history, is_main=False)) is tracking.Tracker
    assert type(tracking.open_tracker(config.load(None, RUN), rd, rid, history, is_main=True)) is tracking.Tracker
    assert len(fake_wandb.inits) == 2


@pytest.mark.parametrize("value", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_naming_its_extra(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, value, None)  # what an environment without the package imports
    with pytest.raises(ConfigError) as e:
        tracking.require(value)
    assert f"error: {e.value}" == {"tensorboard": MISSING_TB, "wandb": MISSING_WANDB}[value]
    tracking.require("off")


HIDE = "import sys; sys.modules['tensorboard'] = sys.modules['wandb'] = None; from ablation.cli import main; sys.exit(main(sys.argv[1:]))"


def test_cli_without_the_package_says_one_line_and_writes_nothing(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    import subprocess

    def hidden(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", HIDE, *args], env=cli_env, capture_output=True, text=True, timeout=300)

    proc = hidden("train", *RUN, f"data.root={tiny_data}", TB, "--results", str(tmp_path / "runs"))
    assert (proc.returncode, proc.stderr.strip()) == (2, MISSING_TB)
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made, not a failed run
    proc = hidden("sweep", str(ROOT / "sweeps" / "tiny.yaml"), f"data.root={tiny_data}", "tracking=wandb", "--dry-run",
                  "--results", str(tmp_path / "results"))
    assert (proc.returncode, proc.stderr.strip()) == (2, MISSING_WANDB)  # a sweep's pre-flight: before any job is queued
