"""Sweeps: spec expansion, the paper presets, dry run, submission, idempotent resubmission, status."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY, ablation
from slurmless import env_without_slurm, path_without_slurm, write_fake_slurm

from ablation import config, rundir
from ablation.config import ConfigError
from ablation.sweep import spec as sweep
from ablation.sweep import status

PAPER = ROOT / "sweeps" / "paper"


def ids(path: Path) -> set[str]:
    """Run ids of a preset."""
    return {r.run_id for r in sweep.load(path).runs}


def test_figure1_is_bn_and_gn_at_five_batch_sizes() -> None:
    s = sweep.load(PAPER / "fig1_batch_size.yaml")
    assert len(s.runs) == 10
    got = {(r.config.norm.name, r.config.batch_per_gpu) for r in s.runs}
    assert got == {(n, b) for n in ("bn", "gn") for b in (32, 16, 8, 4, 2)}
    assert all(r.config.gpus == 8 and r.config.epochs == 100 for r in s.runs)
    gn2 = next(r for r in s.runs if r.config.norm.name == "gn" and r.config.batch_per_gpu == 2)
    assert gn2.config.norm.groups == 32 and config.derive(gn2.config).lr == pytest.approx(0.1 * 2 / 32)


def test_table1_is_bn_ln_in_gn_at_32() -> None:
    s = sweep.load(PAPER / "table1_norms.yaml")
    assert sorted(r.config.norm.name for r in s.runs) == ["bn", "gn", "in", "ln"]
    assert all(r.config.batch_per_gpu == 32 for r in s.runs)


def test_table3_is_14_rows_of_which_table1_already_has_3() -> None:
    s = sweep.load(PAPER / "table3_groups.yaml")
    assert len(s.runs) == 14
    groups = sorted(r.config.norm.groups for r in s.runs if r.config.norm.name == "gn" and r.config.norm.groups)
    cpg = sorted(r.config.norm.channels_per_group for r in s.runs if r.config.norm.channels_per_group)
    assert groups == [2, 4, 8, 16, 32, 64] and cpg == [2, 4, 8, 16, 32, 64]
    shared = ids(PAPER / "table3_groups.yaml") & ids(PAPER / "table1_norms.yaml")
    assert len(shared) == 3 and {i.split("_")[1] for i in shared} == {"gn32", "ln", "in"}
    assert len(ids(PAPER / "fig1_batch_size.yaml") & ids(PAPER / "table1_norms.yaml")) == 2  # BN@32, GN@32


def test_batch_renorm_is_bn_brn_gn_at_4_sharing_figure1s_runs() -> None:
    s = sweep.load(PAPER / "batch_renorm.yaml")
    assert sorted(r.config.norm.name for r in s.runs) == ["bn", "brn", "gn"]
    assert all(r.config.batch_per_gpu == 4 and r.config.gpus == 8 and r.config.model.name == "resnet50" for r in s.runs)
    brn = next(r.config.norm for r in s.runs if r.config.norm.name == "brn")
    assert (brn.r_max, brn.d_max) == (1.5, 0.5)
    assert len(ids(PAPER / "batch_renorm.yaml") & ids(PAPER / "fig1_batch_size.yaml")) == 2  # BN@4, GN@4


def test_variants_is_every_builtin_variant_at_five_batch_sizes() -> None:
    s = sweep.load(ROOT / "sweeps" / "variants.yaml")
    got = {(r.config.norm.name, r.config.model.weight_std, r.config.batch_per_gpu) for r in s.runs}
    norms = [("bn", False), ("brn", False), ("gn", False), ("gn", True), ("frn", False), ("evonorm_s0", False), ("evonorm_b0", False)]
    assert len(s.runs) == 35 and got == {(n, ws, b) for n, ws in norms for b in (32, 16, 8, 4, 2)}
    assert ids(PAPER / "fig1_batch_size.yaml") < ids(ROOT / "sweeps" / "variants.yaml")
    assert ids(PAPER / "batch_renorm.yaml") < ids(ROOT / "sweeps" / "variants.yaml")


def test_every_preset_loads_and_passes_the_checks_before_queueing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every YAML under sweeps/ is a sweep spec (it has a name) or a run config; each expands, and each distinct
    model and norm in it builds and runs (check_model_norm), as `ablation sweep` checks before queueing."""
    from ablation.train.models import check_model_norm

    monkeypatch.syspath_prepend(str(ROOT / "sweeps" / "examples"))  # the worked example's norm, as its README says
    files = sorted((ROOT / "sweeps").rglob("*.yaml"))
    assert {"fig1_batch_size.yaml", "batch_renorm.yaml", "variants.yaml", "my_norm.yaml", "tiny.yaml"} <= {f.name for f in files}
    checked = set()
    for f in files:
        cfgs = [r.config for r in sweep.load(f).runs] if "name" in (yaml.safe_load(f.read_text()) or {}) else [config.load(f)]
        for cfg in cfgs:
            key = repr((cfg.model, cfg.norm))
            if key not in checked:
                checked.add(key)
                check_model_norm(cfg)


def test_zip_conditions_exclude_and_seeds() -> None:
    spec = {
        "name": "t",
        "base": {"epochs": 1},
        "grid": {"norm.name": ["bn", "gn"]},
        "zip": {"batch_per_gpu": [32, 2], "optim.lr": [0.1, 0.2]},
        "conditions": [{"when": {"norm.name": "gn"}, "grid": {"norm.groups": [32, 16]}}],
        "exclude": [{"norm.name": "bn", "batch_per_gpu": 2}],
        "seeds": 2,
    }
    s = sweep.expand(spec)
    got = sorted((r.config.norm.name, r.config.batch_per_gpu, r.config.optim.lr, r.config.norm.groups, r.config.seed) for r in s.runs)
    expected = sorted(
        [("bn", 32, 0.1, None, seed) for seed in (0, 1)]
        + [("gn", b, lr, g, seed) for b, lr in ((32, 0.1), (2, 0.2)) for g in (32, 16) for seed in (0, 1)]
    )
    assert got == expected
    assert set(s.axes) == {"norm.name", "batch_per_gpu", "optim.lr", "norm.groups", "seed"}


def test_overrides_change_the_base_but_not_the_axes() -> None:
    s = sweep.load(PAPER / "fig1_batch_size.yaml", ["data.root=/datasets/imagenet", "epochs=90"])
    assert all(r.config.data.root == "/datasets/imagenet" and r.config.epochs == 90 for r in s.runs)
    with pytest.raises(ConfigError, match="override 'batch_per_gpu' conflicts with the sweep axis"):
        sweep.load(PAPER / "fig1_batch_size.yaml", ["batch_per_gpu=4"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"grid": {"seed": [0]}}, "'name' must be a folder name"),
        ({"name": "x", "gird": {}}, r"unknown key 'gird' \(did you mean 'grid'\?\)"),
        ({"name": "x", "grid": {"batch_per_gpu": 4}}, "grid.batch_per_gpu: expected a non-empty list"),
        ({"name": "x", "grid": {"batch_per_gpu": []}}, "grid.batch_per_gpu: expected a non-empty list"),
        ({"name": "x", "zip": {"batch_per_gpu": [1, 2], "seed": [0]}}, "zipped axes need equal lengths"),
        ({"name": "x", "grid": {"batch_per_gpu": [0]}}, r"run with batch_per_gpu=0: batch_per_gpu must be > 0"),
        ({"name": "x", "grid": {"norm.nme": ["gn"]}}, r"unknown config key 'norm.nme'"),
        ({"name": "x", "conditions": [{"grid": {"seed": [1]}}]}, "needs a 'when' mapping"),
        ({"name": "x", "grid": {"seed": [0]}, "exclude": [{"seed": 0}]}, "expands to no runs"),
        ({"name": "x", "grid": {"seed": [0]}, "zip": {"seed": [1]}}, "axis seed is set twice"),
        ({"name": "x", "seeds": "three"}, "seeds: expected a list of ints or a count"),
        ({"name": "x", "blocks": []}, "blocks: expected a non-empty list"),
    ],
)
def test_malformed_specs_are_clear_errors(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep.expand(spec, source="spec.yaml")


def test_dry_run_counts_runs_and_gpu_hours_and_writes_nothing(tmp_path: Path, cli_env: dict[str, str]) -> None:
    profile = ROOT / "slurm" / "profiles" / "example-cluster.yaml"
    proc = ablation(["sweep", str(PAPER / "fig1_batch_size.yaml"), "--dry-run", "--no-data-check", "--profile", str(profile),
                     "--results", str(tmp_path)], cli_env)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("10 runs: 10 to submit") and "8 GPU(s) per job (1 node(s) x 8 task(s))" in last
    # 100 epochs x 1,281,167 images at the profile's per-GPU throughput for the run's images per GPU, BN and GN at each
    table = yaml.safe_load(profile.read_text())["throughput_images_per_s"]
    hours = sum(2 * 100 * 1_281_167 / table[b] / 3600 for b in (32, 16, 8, 4, 2))
    assert f"~{hours:.1f} GPU-hours from ILLUSTRATIVE throughputs" in last  # the example profile's figures are placeholders
    assert "32: 400, 16: 380, 8: 330, 4: 250, 2: 150 (profile example-cluster's table)" in last  # each batch's figure and its source
    assert not any(tmp_path.iterdir())


@pytest.fixture
def no_slurm_env(cli_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """cli_env on a machine where SLURM was never installed: its commands are not on PATH."""
    env = env_without_slurm(cli_env, tmp_path_factory.mktemp("slurmless"))
    assert all(shutil.which(c, path=env["PATH"]) is None for c in ("sbatch", "srun", "squeue")), env["PATH"]
    return env


def test_slurmless_path_hides_slurm_and_nothing_else(tmp_path: Path) -> None:
    bin_dir = write_fake_slurm(tmp_path / "bin")
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "slurmd").symlink_to(bin_dir / "srun")
    path = path_without_slurm(tmp_path / "farm", os.pathsep.join([str(bin_dir), "/nonexistent"]))
    assert [shutil.which(c, path=path) for c in ("sbatch", "srun", "slurmd")] == [None, None, None]
    assert Path(shutil.which("python3", path=path)).resolve() == Path(sys.executable).resolve()
    assert path.split(os.pathsep)[1] == "/nonexistent" and (bin_dir / "sbatch").exists()


def test_print_sbatch_shows_the_job_script_without_slurm(tmp_path: Path, no_slurm_env: dict[str, str]) -> None:
    """Planning a sweep and reading its script happen on a laptop, before logging into the cluster."""
    profile = ROOT / "slurm" / "profiles" / "example-cluster.yaml"
    args = ["sweep", str(PAPER / "table1_norms.yaml"), "--dry-run", "--no-data-check", "--print-sbatch", "--profile", str(profile),
            "--results", str(tmp_path)]
    proc = ablation(args, no_slurm_env)
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --gpus-per-node=8" in proc.stdout and "#SBATCH --ntasks-per-node=8" in proc.stdout
    assert "#SBATCH --signal=USR2@" in proc.stdout and "#SBATCH --partition=gpu" in proc.stdout
    # the command submitit runs inside the job: srun starts one submitit worker per task
    slurm_dir = tmp_path / "table1_norms" / "slurm" / "%j"
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("srun --unbuffered --output ") and command.endswith(f" -u -m submitit.core._submit {slurm_dir}")
    assert not any(tmp_path.iterdir())


def test_print_sbatch_is_the_script_submitit_submits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the private submitit names sbatch_script uses: its text is the file submitit hands to sbatch."""
    from ablation.sweep import launch, slurmjobs
    from ablation.sweep.cluster import load_profile

    fake = write_fake_slurm(tmp_path / "fake-slurm", job_id=4242)
    monkeypatch.setenv("PATH", os.pathsep.join([str(fake), path_without_slurm(tmp_path / "farm")]))
    profile = load_profile(ROOT / "slurm" / "profiles" / "example-cluster.yaml", None)
    s = sweep.load(PAPER / "table1_norms.yaml")
    results = tmp_path / "results"
    sweep_dir = launch.prepare(s, results, [])
    launch.submit(sweep_dir, [s.runs[0].run_id], profile, results, on_line=lambda line: None)
    submitted = (sweep_dir / "slurm" / "4242" / "4242_submission.sh").read_text()
    assert "#SBATCH --job-name=ablation-table1_norms" in submitted
    assert slurmjobs.sbatch_script(sweep_dir, profile, s.runs[0].config, s.name) == submitted


def test_bad_norm_in_a_sweep_fails_before_anything_is_written(tmp_path: Path, cli_env: dict[str, str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nbase: {norm.name: gn}\ngrid: {norm.groups: [32, 48]}\n")
    proc = ablation(["sweep", str(spec), "--results", str(tmp_path / "results")], cli_env)
    assert proc.returncode == 2 and "norm.groups=48 does not divide" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_missing_dataset_fails_before_anything_is_submitted(tmp_path: Path, cli_env: dict[str, str]) -> None:
    args = ["sweep", str(ROOT / "sweeps" / "tiny.yaml"), f"data.root={tmp_path / 'nowhere'}", "--results", str(tmp_path / "results")]
    proc = ablation(args, cli_env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: dataset folder") and "nowhere" in proc.stderr and "--no-data-check" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "results").exists()


def tiny_args(tiny_data: Path, results: Path) -> list[str]:
    """The tiny sweep on the session's data."""
    return ["sweep", str(ROOT / "sweeps" / "tiny.yaml"), f"data.root={tiny_data}", "--results", str(results)]


def test_sweep_runs_once_and_resubmits_only_what_is_not_done(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    results = tmp_path / "results"
    first = ablation([*tiny_args(tiny_data, results), "--executor", "debug"], cli_env)
    assert first.returncode == 0, first.stderr
    sweep_dir = results / "tiny"
    manifest = json.loads((sweep_dir / "manifest.json").read_text())
    assert len(manifest["runs"]) == 4
    for run in manifest["runs"]:
        final = json.loads((sweep_dir / "runs" / run["run_id"] / "final.json").read_text())
        assert final["status"] == "ok"
    jobs = rundir.read_jsonl(sweep_dir / "jobs.jsonl")
    assert len(jobs) == 4

    again = ablation([*tiny_args(tiny_data, results), "--executor", "debug"], cli_env)
    assert "4 runs: 0 to submit" in again.stdout and "nothing to submit" in again.stdout
    assert len(rundir.read_jsonl(sweep_dir / "jobs.jsonl")) == 4

    # A failed run is retried only when asked; a stopped one (no final status) is resumed.
    a, b = manifest["runs"][0]["run_id"], manifest["runs"][1]["run_id"]
    final_a = sweep_dir / "runs" / a / "final.json"
    doc = json.loads(final_a.read_text())
    final_a.write_text(json.dumps({**doc, "status": "failed", "reason": "RuntimeError: boom"}))
    (sweep_dir / "runs" / b / "final.json").unlink()
    dry = ablation([*tiny_args(tiny_data, results), "--dry-run"], cli_env)
    assert "4 runs: 1 to submit" in dry.stdout
    states = {line.split()[-1]: line for line in dry.stdout.splitlines() if "resnet18_" in line}
    assert " failed " in states[a] and " stopped " in states[b]
    retry = ablation([*tiny_args(tiny_data, results), "--executor", "debug", "--retry-failed"], cli_env)
    assert "4 runs: 2 to submit" in retry.stdout, retry.stdout
    st = ablation(["status", str(sweep_dir)], cli_env)
    assert st.returncode == 0 and st.stdout.strip().splitlines()[-1] == "4 runs: 4 ok"


def test_two_sweeps_share_a_run_folder(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    results = tmp_path / "results"
    other = tmp_path / "other.yaml"
    text = (ROOT / "sweeps" / "tiny.yaml").read_text()
    text = text.replace("name: tiny", "name: tiny_bn_only").replace("norm.name: [bn, gn]", "norm.name: [bn]")
    other.write_text(text)
    assert ablation([*tiny_args(tiny_data, results), "--executor", "debug"], cli_env).returncode == 0
    proc = ablation(["sweep", str(other), f"data.root={tiny_data}", "--results", str(results), "--executor", "debug"], cli_env)
    assert "2 runs: 0 to submit" in proc.stdout
    links = sorted(os.readlink(p) for p in (results / "tiny_bn_only" / "runs").iterdir()) if (results / "tiny_bn_only").exists() else []
    assert links == []  # nothing submitted: the sweep folder is only written when something runs
    assert len(list((results / "runs").iterdir())) == 4


def test_status_of_a_folder_that_is_not_a_sweep(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["status", str(tmp_path)], cli_env)
    assert proc.returncode == 2 and "is not a sweep folder" in proc.stderr


def test_status_summary_and_eta() -> None:
    s = [
        status.RunState("a", {}, "ok", 10, 10, 1.0, None, 1, 5.0),
        status.RunState("b", {}, "running", 4, 10, 2.0, None, 1, 5.0),
        status.RunState("c", {}, "new", 0, 10, None, None, 0, None),
    ]
    assert status.summary(s, parallel=1) == "3 runs: 1 ok, 1 running, 1 new; ETA ~1m20s"  # (6 + 10) epochs x 5 s


def test_a_local_child_is_forked_preloaded_with_the_output_of_a_process_of_its_own(tiny_data: Path, tmp_path: Path) -> None:
    """The local executor forks each run from a server that imported torch once; the child writes its
    log, which is echoed prefixed, and exits with `ablation train`'s code."""
    import yaml

    from ablation.sweep import local

    ok_cfg, bad_cfg, runs = tmp_path / "ok.yaml", tmp_path / "bad.yaml", tmp_path / "runs"
    cfg = config.load(None, [*TINY, f"data.root={tiny_data}", "epochs=1", "gpus=1", "batch_per_gpu=32"])
    ok_cfg.write_text(yaml.safe_dump(config.to_dict(cfg)))
    bad_cfg.write_text("nosuchkey: 1\n")
    log, lines = tmp_path / "run.out", []
    ok = local._Child(str(ok_cfg), str(runs), dict(os.environ), log, "[1/2] ", lines.append, 1)
    assert ok.wait() == 0
    ok.finish()
    assert (runs / config.run_id(cfg) / "final.json").is_file() and f"[1/2] {runs / config.run_id(cfg)}" in lines
    bad = local._Child(str(bad_cfg), str(runs), dict(os.environ), log, "[2/2] ", lines.append, 1)
    assert bad.wait() == 2
    bad.finish()
    assert any(line.startswith("[2/2] error: ") and "nosuchkey" in line for line in lines)
    assert str(runs / config.run_id(cfg)) in log.read_text().splitlines()  # the second child appended to the same log
    assert local._forkserver() is not None and bad.pid != ok.pid != os.getpid()


# ---------------------------------------------------------------- the pre-flight (a dry run checks what a submission checks)


def test_dry_run_checks_the_data_as_a_submission_does(tmp_path: Path, cli_env: dict[str, str]) -> None:
    args = ["sweep", str(PAPER / "fig1_batch_size.yaml"), "data.root=/nonexistent", "--dry-run", "--results", str(tmp_path)]
    proc = ablation([*args, "--profile", str(ROOT / "slurm" / "profiles" / "example-cluster.yaml")], cli_env)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert proc.stderr.strip().splitlines() == [
        "error: dataset folder /nonexistent does not exist; point data.root at a folder holding train/ and val/ in ImageNet "
        "(ImageFolder) layout (if the data exists only on the compute nodes, pass --no-data-check)"
    ]
    skipped = ablation([*args, "--profile", str(ROOT / "slurm" / "profiles" / "example-cluster.yaml"), "--no-data-check"], cli_env)
    assert skipped.returncode == 0, skipped.stderr
    assert "; data: skipped (--no-data-check)" in skipped.stdout  # said, not silently left out
    assert not any(tmp_path.iterdir())


def test_dry_run_names_what_it_checked(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation([*tiny_args(tiny_data, tmp_path / "results"), "--dry-run"], cli_env)
    assert proc.returncode == 0, proc.stderr
    checked = next(line for line in proc.stdout.splitlines() if line.startswith("checked: "))
    assert checked == (f"checked: profile default (built-in: this machine, one process per run); norms and G on every layer; "
                       f"data: {tiny_data} has train/ and val/")


def test_the_paper_network_is_not_trained_here_without_saying_so(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """ResNet-50 at 224 px with no profile would train ten runs in the foreground of a login node: refused, both ways out named."""
    args = ["sweep", str(PAPER / "fig1_batch_size.yaml"), "--no-data-check", "--results", str(tmp_path)]
    for extra in ([], ["--dry-run"]):
        proc = ablation([*args, *extra], cli_env)
        assert proc.returncode == 2 and proc.stdout == ""
        line = proc.stderr.strip()
        assert line.startswith("error: sweep fig1_batch_size: 10 run(s) of resnet50 at 224 px would train on this machine")
        assert "--profile slurm/profiles/<cluster>.yaml" in line and "--executor local" in line and "\n" not in line
    said = ablation([*args, "--dry-run", "--executor", "local"], cli_env)  # said out loud: a GPU node the user is on
    assert said.returncode == 0 and "10 jobs on local (default)" in said.stdout, said.stderr
    small = ablation([*args, "--dry-run", "data.image_size=64", "data.eval_resize=73"], cli_env)  # not the paper's size
    assert small.returncode == 0, small.stderr
    assert not any(tmp_path.iterdir())


def test_default_profile_from_the_environment_or_the_user_config(tmp_path: Path, cli_env: dict[str, str]) -> None:
    example = ROOT / "slurm" / "profiles" / "example-cluster.yaml"
    args = ["sweep", str(PAPER / "fig1_batch_size.yaml"), "--no-data-check", "--dry-run", "--results", str(tmp_path / "r")]
    env = {**cli_env, "ABLATION_PROFILE": str(example)}
    proc = ablation(args, env)
    assert proc.returncode == 0, proc.stderr
    assert f"checked: profile example-cluster ({example}, from $ABLATION_PROFILE);" in proc.stdout
    home = tmp_path / "xdg"
    (home / "ablation").mkdir(parents=True)
    (home / "ablation" / "config.yaml").write_text(f"profile: {example}\n")
    env = {**cli_env, "XDG_CONFIG_HOME": str(home)}
    proc = ablation(args, env)
    assert proc.returncode == 0, proc.stderr
    assert f"checked: profile example-cluster ({example}, from {home / 'ablation' / 'config.yaml'});" in proc.stdout
    listed = ablation(["sweep", "--list"], env)
    assert f"default profile: {example} (from {home / 'ablation' / 'config.yaml'})" in listed.stdout
    (home / "ablation" / "config.yaml").write_text(f"profle: {example}\n")
    bad = ablation(args, env)
    user_file = home / "ablation" / "config.yaml"
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {user_file}: unknown key(s) profle; valid: profile"


def test_sweep_list_shows_presets_and_profiles(cli_env: dict[str, str]) -> None:
    proc = ablation(["sweep", "--list"], cli_env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    presets = {line.split()[0]: line for line in lines[1 : lines.index("cluster profiles:")]}
    sweeps = [p for p in (ROOT / "sweeps").rglob("*.yaml") if {"grid", "blocks", "zip"} & set(yaml.safe_load(p.read_text()))]
    expected = {str(p.relative_to(ROOT)) for p in sweeps}
    assert set(presets) == expected and "sweeps/examples/one_run.yaml" not in presets  # a run config is not a sweep
    assert "Wu & He Figure 1" in presets["sweeps/paper/fig1_batch_size.yaml"]
    assert "  slurm/profiles/example-cluster.yaml" in proc.stdout and "executor slurm, 8 GPU(s) per node" in proc.stdout
    assert lines[-1].startswith("default profile: built-in")


def test_profile_typos_are_all_named_as_profile_keys(tmp_path: Path) -> None:
    from ablation.sweep.cluster import load_profile

    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\npartiton: gpu\nacount: me\n")
    with pytest.raises(ConfigError) as e:
        load_profile(bad)
    assert str(e.value).startswith(f"{bad}: unknown profile keys 'partiton' (did you mean 'partition'?), "
                                   "'acount' (did you mean 'account'?); valid: name, executor, partition, account")


def test_status_of_a_results_root_lists_its_sweeps_and_json_has_every_run(tmp_path: Path, cli_env: dict[str, str]) -> None:
    from ablation.sweep import launch

    results = tmp_path / "results"
    folders = [launch.prepare(sweep.load(PAPER / name), results, []) for name in ("table1_norms.yaml", "fig1_batch_size.yaml")]
    listed = ablation(["status", str(results)], cli_env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["fig1_batch_size", "table1_norms"]  # by name
    assert "10 runs: 10 new" in lines[0] and str(folders[1]) in lines[0]
    assert lines[-1] == f"2 sweep(s) in {results}; one in full: ablation status {folders[1]}"
    doc = json.loads(ablation(["status", str(results), "--json"], cli_env).stdout)
    assert [s["sweep"] for s in doc["sweeps"]] == ["fig1_batch_size", "table1_norms"]
    one = json.loads(ablation(["status", "--json", str(folders[1])], cli_env).stdout)  # options in any order
    assert one["counts"] == {"new": 10} and one["axes"] == ["norm.name", "batch_per_gpu"]
    assert {r["run_id"] for r in one["runs"]} == ids(PAPER / "fig1_batch_size.yaml")
    assert {(r["state"], r["epochs_done"], r["epochs"]) for r in one["runs"]} == {("new", 0, 100)}
    assert doc["sweeps"][0] == one
