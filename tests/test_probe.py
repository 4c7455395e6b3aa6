"""`ablation probe`: batch dependence and train/eval gap per norm and images per GPU, its files and its errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import ablation

from ablation import cli, probe
from ablation.errors import ConfigError
from ablation.norms import registry

BATCH_FREE = ("gn", "ln", "in")
FLOAT_ZERO = 1e-5  # float32 features: a norm that never looks across images changes them by rounding at most


def files_in(folder: Path) -> list[str]:
    """Every name in a folder, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir())


def test_cli_end_to_end_separates_bn_from_batch_free_norms(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "probe"
    norms = ["bn", *BATCH_FREE]
    proc = ablation(["probe", "--norms", ",".join(norms), "--batches", "32,8,2", "--warmup", "20", "--out", str(out)], cli_env,
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert files_in(out) == ["probe.csv", "probe.png"]  # nothing temporary left behind
    lines = proc.stdout.strip().splitlines()
    assert str(out / "probe.csv") in lines[-1] and str(out / "probe.png") in lines[-1]
    assert "b=32" in proc.stdout and "b=2" in proc.stdout and all(any(line.startswith(n + " ") for line in lines) for n in norms)
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    df = pd.read_csv(out / "probe.csv")
    assert list(df.columns) == list(probe.COLUMNS)
    assert sorted(zip(df["norm"], df["batch_per_gpu"])) == sorted((n, b) for n in norms for b in (32, 8, 2))
    for name, grp in df.groupby("norm"):
        info = registry.lookup(name)
        for fact in probe.REGISTRY_FACTS:
            assert (grp[fact] == getattr(info, fact)).all(), (name, fact)
    at = df.set_index(["norm", "batch_per_gpu"])
    # BN: an image's features move with its batch mates, and training and evaluation disagree, more so at 2 per GPU
    assert at.loc[("bn", 2), "batch_dependence"] > 0.1 and at.loc[("bn", 2), "train_eval_gap"] > 0.1
    assert at.loc[("bn", 2), "batch_dependence"] > at.loc[("bn", 32), "batch_dependence"]
    assert at.loc[("bn", 2), "train_eval_gap"] > at.loc[("bn", 32), "train_eval_gap"]
    assert at.loc[("bn", 2), "updates_buffers"]
    # GN, LN, IN: nothing, to float precision, at any batch size: BN at 2 is orders of magnitude above
    free = df[df["norm"].isin(BATCH_FREE)]
    assert (free["batch_dependence"] < FLOAT_ZERO).all() and (free["train_eval_gap"] < FLOAT_ZERO).all()
    assert not free["updates_buffers"].any()
    assert at.loc[("bn", 2), "batch_dependence"] > 1e3 * max(free["batch_dependence"].max(), 1e-12)


def test_user_norm_by_import_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # tests/ is on sys.path (conftest), as PYTHONPATH puts a user's package there
    name = "plugins.mynorms:rms_norm"
    code = cli.main(["probe", f"norm.name={name}", "norm.options.scale=2.0", "--batches", "4,2", "--warmup", "2", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    df = pd.read_csv(tmp_path / "probe.csv")
    assert df["norm"].tolist() == [name, name] and df["batch_per_gpu"].tolist() == [4, 2]
    assert (df["batch_dependence"] < FLOAT_ZERO).all() and (df["train_eval_gap"] < FLOAT_ZERO).all()
    assert df[list(probe.REGISTRY_FACTS)].isna().all().all()  # no registry facts for a user's norm
    assert name in capsys.readouterr().out


def test_bad_norm_name_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "probe"
    out.mkdir()
    (out / "probe.csv").write_text("earlier\n")  # an earlier probe's file stays as it was
    proc = ablation(["probe", "--norms", "bn,groupnorm", "--out", str(out)], cli_env, cwd=tmp_path)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "'groupnorm'" in err[0]
    assert files_in(out) == ["probe.csv"] and (out / "probe.csv").read_text() == "earlier\n"
    assert proc.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["norm.name=nosuch"], "unknown norm 'nosuch'"),
        (["norm.grups=4"], "unknown config key 'norm.grups'"),
        (["--norms", "nosuchpkg.mod:f"], "cannot import module 'nosuchpkg.mod'"),
        (["--norms", "bn", "norm.groups=4"], "norm.groups applies to gn"),
        (["--norms", "gn", "norm.groups=3"], "norm.groups=3 does not divide"),
        (["norm.name=gn", "--norms", "bn"], "either as norm.name=... or as --norms"),
        (["--batches", "8,two"], "--batches: expected integers"),
        (["--batches", "0"], "--batches: expected positive"),
        (["--draws", "1"], "--draws must be at least 2"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_file(args: list[str], message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "probe"
    assert cli.main(["probe", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_unwritable_out_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["probe", "--norms", "gn", "--out", str(blocker / "probe")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {blocker / 'probe'}: cannot write there")


SMALL = probe.Settings(batches=(4,), draws=2, probes=2, warmup=3)


def test_deterministic_given_the_seed() -> None:
    bn = probe.configs(None, [], ["bn"])
    first, again = probe.run(bn, SMALL), probe.run(bn, SMALL)
    pd.testing.assert_frame_equal(first, again)
    other = probe.run(probe.configs(None, ["seed=1"], ["bn"]), SMALL)
    assert other["batch_dependence"].iloc[0] != first["batch_dependence"].iloc[0]


def test_stand_in_batches_hold_gpus_times_b_images() -> None:
    s = probe.Settings(batches=(2,), draws=2, probes=1, warmup=2, gpus=2)
    d = probe.draws(0, 2, 64, s)
    assert all(len(idx) == 4 for idx in d.warmup) and all(len(idx) == 4 and len(set(idx)) == 4 for idx in d.trials[0])
    df = probe.run(probe.configs(None, [], ["bn"]), s)
    assert df["gpus"].tolist() == [2] and df["batch_dependence"].iloc[0] > 0.1


def test_norm_fields_reach_the_norms_that_take_them() -> None:
    bn, gn = probe.configs(None, ["norm.groups=16", "norm.momentum=0.01"], ["bn", "gn"])
    assert (bn.norm.name, bn.norm.groups, bn.norm.momentum) == ("bn", None, 0.01)
    assert (gn.norm.name, gn.norm.groups) == ("gn", 16)
    with pytest.raises(ConfigError, match="norm.groups applies to gn"):
        probe.configs(None, ["norm.groups=16"], ["bn"])


def test_default_norms_are_the_registry_but_none_and_the_model_is_the_probes_unless_named(tmp_path: Path) -> None:
    assert [c.norm.name for c in probe.configs(None, [], None)] == [n for n in registry.names() if n != "none"]
    small = probe.configs(None, ["model.widths=[64,64,64,64]"], ["gn"])[0]
    assert (small.model.name, small.model.widths, small.model.stem, small.data.image_size) == ("resnet18", (64, 64, 64, 64), "small", 32)
    config_file = tmp_path / "run.yaml"
    config_file.write_text("model: {name: resnet10t}\nnorm: {name: gn, groups: 8}\n")
    named = probe.configs(str(config_file), [], None)
    assert [(c.model.name, c.model.widths, c.norm.name, c.norm.groups) for c in named] == [("resnet10t", None, "gn", 8)]


def test_a_failed_write_leaves_the_folder_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("probe.csv", "probe.png"):
        (tmp_path / name).write_text("earlier")
    df = pd.DataFrame([{c: None for c in probe.COLUMNS} | {"norm": "gn", "batch_per_gpu": 2, "batch_dependence": 0.0,
                                                           "train_eval_gap": 0.0}])

    def broken_figure(frame: pd.DataFrame, path: Path) -> None:
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(probe, "figure", broken_figure)
    with pytest.raises(OSError):
        probe.write(df, tmp_path)
    assert files_in(tmp_path) == ["probe.csv", "probe.png"]
    assert all((tmp_path / n).read_text() == "earlier" for n in ("probe.csv", "probe.png"))


def test_weight_standardized_probes_say_so_in_the_table_csv_and_legend(tmp_path: Path) -> None:
    """model.weight_std=true changes every convolution: the rows are GN+WS, not GN, as in the report."""
    s = probe.Settings(batches=(2,), draws=2, probes=1, warmup=2)
    ws = probe.run(probe.configs(None, ["model.weight_std=true"], ["bn", "gn"]), s)
    assert ws["label"].tolist() == ["BN+WS", "GN+WS"] and ws["weight_std"].all()
    table = probe.format_table(ws)
    assert all(any(line.startswith(n + " ") for line in table.splitlines()) for n in ("bn+WS", "gn+WS"))
    plain = probe.run(probe.configs(None, [], ["gn"]), s)
    assert plain["label"].tolist() == ["GN"] and not plain["weight_std"].any() and "+WS" not in probe.format_table(plain)
    probe.figure(ws, tmp_path / "ws.png")
    assert (tmp_path / "ws.png").stat().st_size > 0
