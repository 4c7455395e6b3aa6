"""The command line: entry points, help, the placeholder demo, one-line errors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
from helpers import ablation

from ablation import rundir
from ablation.cli import build_parser


def test_help_lists_the_commands(cli_env: dict[str, str]) -> None:
    proc = ablation(["--help"], cli_env)
    assert proc.returncode == 0
    for command in ("train", "config", "data", "demo"):
        assert command in proc.stdout


def test_config_prints_the_resolved_config_and_derived_values(cli_env: dict[str, str]) -> None:
    import yaml

    proc = ablation(["config", "norm.name=gn", "batch_per_gpu=2"], cli_env)
    doc = yaml.safe_load(proc.stdout)
    assert doc["run_id"].startswith("resnet50_gn32_b2x8_s0_")
    assert doc["derived"]["global_batch"] == 16 and doc["derived"]["steps_per_epoch"] == 1_281_167 // 16


def test_norms_lists_the_registry_with_each_norms_fields(cli_env: dict[str, str]) -> None:
    from ablation.norms import registry

    proc = ablation(["norms"], cli_env)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:] if line and not line[0].isspace()}
    assert set(registry.names()) <= set(rows)
    assert rows["bn"].split()[1:3] == ["per", "GPU"] and rows["gn"].split()[1:3] == ["per", "image"]
    lines = proc.stdout.splitlines()
    assert "norm.r_max" in lines[lines.index(rows["brn"]) + 1]  # the fields a norm takes, under it


def test_bad_override_is_one_line_and_exit_2(cli_env: dict[str, str]) -> None:
    proc = ablation(["config", "norm.grups=4"], cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'norm.grups' (did you mean 'norm.groups'?); valid: norm.{name, groups, channels_per_group, eps, "
        "momentum, running_stats, precise_bn_images, r_max, d_max, renorm_warmup_steps, options, batch}"
    ]


def test_version_names_ablation_and_the_libraries_behind_its_numbers(cli_env: dict[str, str]) -> None:
    import ablation as package
    from ablation import provenance

    proc = ablation(["--version"], cli_env)
    assert proc.returncode == 0, proc.stderr
    torch_version = provenance.package_versions()["torch"]
    assert proc.stdout.startswith(f"ablation {package.__version__} (Python ") and f"torch {torch_version}," in proc.stdout


def test_config_checks_the_norm_against_every_layer(cli_env: dict[str, str]) -> None:
    proc = ablation(["config", "norm.name=gn", "norm.groups=7"], cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: norm.groups=7 does not divide a layer's 64 channels") and len(proc.stderr.splitlines()) == 1


def test_an_override_typed_as_an_option_is_told_the_key_value_form(cli_env: dict[str, str]) -> None:
    proc = ablation(["config", "--data.root=/x"], cli_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "ablation: error: unrecognized arguments: --data.root=/x; config overrides are key=value without dashes, e.g. data.root=/x")
    plain = ablation(["config", "--nonsense"], cli_env)  # an unknown option that is no config key: argparse's own words
    assert plain.stderr.strip().splitlines()[-1] == "ablation: error: unrecognized arguments: --nonsense"


def test_a_report_of_nothing_leaves_no_output_folder(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["report", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "r2")], cli_env)
    assert proc.returncode != 0 and "nonexistent" in proc.stderr and not (tmp_path / "r2").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "r3").mkdir()
    (tmp_path / "r3" / "mine.txt").write_text("kept")
    proc = ablation(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r3")], cli_env)
    assert proc.returncode != 0 and "no run folders" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "r3").iterdir()) == ["mine.txt"]  # a folder that was there stays, as it was


def test_data_synth_and_check(tmp_path: Path, cli_env: dict[str, str]) -> None:
    root = tmp_path / "tiny"
    args = ["data", "synth", str(root), "--classes", "3", "--train-per-class", "4", "--val-per-class", "2", "--size", "16"]
    assert ablation(args, cli_env).stdout.startswith("wrote")
    assert "cached" in ablation(args, cli_env).stdout
    check = ablation(["data", "check", str(root)], cli_env)
    assert "3 classes, 12 train / 6 val images" in check.stdout
    (root / "val" / "01_ring").rename(root / "val" / "01_rings")
    bad = ablation(["data", "check", str(root)], cli_env)
    assert bad.returncode == 2 and "01_ring" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_quick_trains_the_sweep_and_writes_the_figure_and_table(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["demo", "--quick", "--out", str(tmp_path / "demo")], cli_env)
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "demo" / "report"
    assert (report / "fig_error_vs_batch.png").stat().st_size > 0 and (report / "table_batch_size.md").is_file()
    assert "4 runs: 4 ok" in proc.stdout and "| BN | " in proc.stdout and "| GN (G=8) | " in proc.stdout
    runs = list((tmp_path / "demo" / "results" / "runs").iterdir())
    assert len(runs) == 4 and all(json.loads((r / rundir.FINAL).read_text())["status"] == "ok" for r in runs)
    started = [row["run_id"] for row in rundir.read_jsonl(tmp_path / "demo" / "results" / "demo_quick" / "jobs.jsonl")]
    assert ["_b2x8_" in rid for rid in started] == [True, True, False, False]  # longest runs (most steps) first
    again = ablation(["demo", "--quick", "--out", str(tmp_path / "demo")], cli_env)
    assert "4 runs (4 already done)" in again.stdout  # data and runs are cached
    lines = proc.stdout.splitlines()
    assert lines[0] == "demo: --quick is a smoke test of the whole path (data, 4 runs, report): no effect is expected"
    assert "demo: --quick is a smoke test: 3 epochs on 2,000 images train too little to show BN's rise" in proc.stdout
    sweep_dir = tmp_path / "demo" / "results" / "demo_quick"
    assert lines[-2].startswith(f"next: ablation status {sweep_dir} ")  # the commands for its folders, which then work
    assert lines[-1].split("#")[0].split() == ["ablation", "report", str(sweep_dir), "--out", str(tmp_path / "demo" / "report-again")]
    assert ablation(["status", str(sweep_dir)], cli_env).stdout.strip().splitlines()[-1] == "4 runs: 4 ok"
    mcnemar = next(line for line in lines if line.startswith("demo: BN vs GN at 2 images per GPU"))
    assert "on the same 400 validation images" in mcnemar and "McNemar p " in mcnemar  # the quick data's 10 x 40 images
    assert (report / "fig_val_error_vs_epoch.png").stat().st_size > 0  # Figure 5


def test_the_readme_figure_comes_from_the_current_demo_settings() -> None:
    from ablation import demo

    docs = Path(__file__).resolve().parents[1] / "docs"
    meta = json.loads((docs / "demo.json").read_text())
    assert meta["fingerprint"] == demo.fingerprint(), (
        "the demo's settings changed: regenerate the README figure with `ablation demo --docs docs` and commit docs/"
    )
    assert (docs / "demo_error_vs_batch.png").stat().st_size > 10_000
    assert set(meta["made_with"]) >= {"code", "packages", "cpu", "cpu_capability"}  # what decides the digits besides the settings
    assert set(meta["made_with"]["packages"]) >= set(demo.NUMERIC_PACKAGES)


def test_the_demo_durations_are_said_one_way() -> None:
    """README, docs and --help agree: the demo takes about 5 minutes on 2 cores, --quick is a 30-second smoke test."""
    from ablation.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    demo = next(a for a in build_parser()._subparsers._group_actions[0].choices["demo"]._actions if "--quick" in a.option_strings)
    texts = {"--help": demo.help, "README.md": (root / "README.md").read_text(), "docs/demo.md": (root / "docs" / "demo.md").read_text()}
    for where, text in texts.items():
        assert "smoke test" in text and "30 s" in text.replace("30-second", "30 s"), where
    for where in ("README.md", "docs/demo.md"):
        assert "about 5 minutes" in texts[where] and "a minute" not in texts[where] and "half a minute" not in texts[where], where


def test_the_demo_says_whether_the_published_digits_are_expected_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The published table's provenance is compared with this machine: the same everything expects the same digits,
    anything else is named (settings, code, a library, the CPU kernels)."""
    from ablation import demo

    here = {"fingerprint": demo.fingerprint(), "seed": 0, "made_with": demo.made_with()}
    published = tmp_path / "demo.json"
    monkeypatch.setattr(demo, "PUBLISHED", published)
    published.write_text(json.dumps(here))
    assert demo._compare_with_published(0, quick=False).endswith("the same digits are expected")
    other = json.loads(json.dumps(here))
    other["made_with"]["packages"]["torch"] = "2.13.0"
    cpu = "AVX512" if here["made_with"]["cpu_capability"] == "AVX2" else "AVX2"  # another CPU than this one, whichever it is
    other["made_with"]["cpu_capability"] = cpu
    other["made_with"]["code"] = "0123456789abcdef"
    published.write_text(json.dumps(other))
    line = demo._compare_with_published(1, quick=False)
    assert line.startswith("demo: this machine differs from the published table's (docs/demo.md) in ")
    assert line.endswith("expect the effect, not its digits")
    for part in (f"the code ({demo.code_version()}, published 0123456789abcdef)", f"torch {here['made_with']['packages']['torch']} "
                 "(published 2.13.0)", "CPU kernels", f"(published {cpu})", "seed 1 (published 0)"):
        assert part in line
    assert "numpy" not in line and "settings" not in line  # only what differs


def test_demo_publishes_its_figure_table_and_fingerprint_whole(tmp_path: Path) -> None:
    """publish copies the report's figure and table into docs/ with demo.json, each renamed into place."""
    from ablation import demo

    rep = tmp_path / "report"
    rep.mkdir()
    (rep / "fig_error_vs_batch.png").write_bytes(b"\x89PNG figure")
    (rep / "table_batch_size.md").write_text("| BN | 1.0 |\n")
    docs = tmp_path / "docs"  # made on the way
    demo.publish(rep, docs, 281.6, seed=1)
    assert (docs / "demo_error_vs_batch.png").read_bytes() == b"\x89PNG figure"
    assert (docs / "demo_table.md").read_text() == "| BN | 1.0 |\n"
    meta = json.loads((docs / "demo.json").read_text())
    assert (meta["fingerprint"], meta["seed"], meta["wall_seconds"]) == (demo.fingerprint(), 1, 282)
    import torch

    from ablation import provenance

    assert meta["made_with"] == {"code": demo.code_version(), "cpu": provenance.cpu_model(),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                                 "packages": provenance.package_versions()}
    assert sorted(p.name for p in docs.iterdir()) == ["demo.json", "demo_error_vs_batch.png", "demo_table.md"]


# key=value overrides go before, between or after the options (as with hydra, pycls, torchrun).
ORDERS = {
    "sweep": (
        ["sweep", "s.yaml", "a=1", "b=2", "--executor", "local", "--results", "r"],
        ["sweep", "s.yaml", "a=1", "--executor", "local", "b=2", "--results", "r"],
        ["sweep", "--executor", "local", "s.yaml", "--results", "r", "a=1", "b=2"],
    ),
    "train": (
        ["train", "c.yaml", "a=1", "b=2", "--results", "r"],
        ["train", "c.yaml", "a=1", "--results", "r", "b=2"],
        ["train", "--results", "r", "c.yaml", "a=1", "b=2"],
    ),
    "config": (
        ["config", "c.yaml", "a=1", "b=2", "--train-images", "1000", "--list"],
        ["config", "c.yaml", "a=1", "--train-images", "1000", "b=2", "--list"],
        ["config", "--train-images", "1000", "--list", "c.yaml", "a=1", "b=2"],
    ),
}


@pytest.mark.parametrize("where", ["before", "between", "after"])
@pytest.mark.parametrize("command", list(ORDERS))
def test_overrides_anywhere_among_the_options(command: str, where: str) -> None:
    from ablation.cli import build_parser

    args = vars(build_parser().parse_args(ORDERS[command][("before", "between", "after").index(where)]))
    if command == "sweep":
        assert (args["spec"], args["overrides"], args["executor"], args["results"]) == ("s.yaml", ["a=1", "b=2"], "local", "r")
    elif command == "train":
        assert (args["items"], args["results"]) == (["c.yaml", "a=1", "b=2"], "r")
    else:
        assert (args["items"], args["train_images"], args["list"]) == (["c.yaml", "a=1", "b=2"], 1000, True)


def test_no_overrides_and_unknown_arguments_still_parse_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    from ablation.cli import build_parser

    assert build_parser().parse_args(["sweep", "s.yaml", "--dry-run"]).overrides == []
    assert build_parser().parse_args(["train"]).items == []
    from ablation.cli import main

    for argv, message in ((["sweep", "s.yaml", "a=1", "--bogus"], "ablation: error: unrecognized arguments: --bogus"),
                          (["train", "--bogus", "a=1"], "ablation: error: unrecognized arguments: --bogus"),
                          (["sweep", "--dry-run"], "ablation sweep: error: the following arguments are required: spec")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)  # the spec may be left out beside --list only: the sweep command says so, as argparse would
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith(message)


def test_config_override_after_an_option_is_applied(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from ablation.cli import main

    assert main(["config", "norm.name=gn", "--train-images", "1600", "batch_per_gpu=2"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["run_id"].startswith("resnet50_gn32_b2x8_s0_") and doc["derived"]["steps_per_epoch"] == 1600 // 16


def test_train_override_after_an_option_reaches_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ablation.cli import main

    assert main(["train", "--results", str(tmp_path), "norm.grups=4"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown config key 'norm.grups'") and not any(tmp_path.iterdir())


def test_sweep_override_after_an_option_reaches_the_sweep(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The issue's command line: the override after --executor is used (here: its data.root is checked)."""
    root = Path(__file__).resolve().parents[1]
    nowhere = tmp_path / "nowhere"
    proc = ablation(["sweep", str(root / "sweeps" / "tiny.yaml"), "--executor", "local", f"data.root={nowhere}", "--results",
                     str(tmp_path / "r")], cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: dataset folder") and str(nowhere) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run's pass 1 is the README's test command, character for character."""
    import shlex

    root = Path(__file__).resolve().parents[1]
    readme = next(line for line in (root / "README.md").read_text().splitlines() if "# the whole suite on every core" in line)
    command = readme.split("#")[0].strip()
    ci = next(line for line in (root / ".ci" / "run").read_text().splitlines() if line.startswith("README_TEST_COMMAND="))
    assert shlex.split(ci.split("=", 1)[1]) == [command]
    assert 'bash -c "$README_TEST_COMMAND"' in (root / ".ci" / "run").read_text()


def _arguments(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, action) of every argument of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_argument_has_help_and_says_its_default() -> None:
    """`--help` is the reference a user reads first: no argument without a text, no option whose default is unsaid."""
    missing = []
    for path, action in _arguments(build_parser()):
        text = action.help or ""
        unsaid = action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
        if not text or unsaid:
            missing.append(f"ablation {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    assert len(list(_arguments(build_parser()))) > 40  # the walk reaches every subcommand
