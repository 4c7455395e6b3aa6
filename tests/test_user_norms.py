"""A user's own norm end to end: the worked example (sweeps/examples/my_norm.py and .yaml) through
sweep -> train -> report, and the mistakes a user makes caught as one line before any work is queued."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from helpers import ROOT, TINY, ablation

from ablation import config
from ablation.errors import NormError
from ablation.norms import NormSpec, create_norm
from ablation.sweep import spec as sweep
from ablation.train.models import check_model_norm

EXAMPLES = ROOT / "sweeps" / "examples"
EXAMPLE = EXAMPLES / "my_norm.yaml"
NAME = "my_norm:my_norm"


@pytest.fixture(scope="module")
def my_norm_module():
    """sweeps/examples/my_norm.py imported as the module `my_norm`, as PYTHONPATH=sweeps/examples makes it."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import my_norm

        yield my_norm
    finally:
        sys.path.remove(str(EXAMPLES))


def tiny(*overrides: str) -> config.RunConfig:
    """The tests' tiny ResNet-18 (widths 8, 16) with these overrides."""
    return config.load(None, [*TINY, *overrides])


# ---------------------------------------------------------------- the worked example


def test_example_sweep_puts_the_norm_beside_the_papers_bn_and_gn_runs() -> None:
    s = sweep.load(EXAMPLE)
    got = {(r.config.norm.name, r.config.batch_per_gpu) for r in s.runs}
    assert got == {(n, b) for n in ("bn", "gn", NAME) for b in (32, 16, 8, 4, 2)}
    mine = [r.config for r in s.runs if r.config.norm.name == NAME]
    assert all(dict(c.norm.options) == {"groups": 32, "affine": True} and c.model.name == "resnet50" and c.gpus == 8 for c in mine)
    paper = {r.run_id for r in sweep.load(ROOT / "sweeps" / "paper" / "fig1_batch_size.yaml").runs}
    theirs = {r.run_id for r in s.runs if r.config.norm.name != NAME}
    assert theirs == paper  # the options are the user norm's alone: BN and GN reuse Figure 1's run folders


def test_example_norm_is_the_group_rms_definition_per_image_with_its_options(my_norm_module) -> None:
    cfg = config.replace(config.RunConfig(), **{"norm.name": NAME, "norm.options": {"groups": 4, "affine": True}}).norm
    layer = create_norm(16, NormSpec(cfg))
    assert type(layer).__name__ == "GroupRMSNorm2d" and layer.groups == 4 and layer.eps == 1e-5
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, 16))
        layer.bias.copy_(torch.linspace(-1.0, 1.0, 16))
    x = torch.randn(3, 16, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 + 1
    g = x.reshape(3, 4, 4, 5, 5)
    expected = (g / torch.sqrt(g.pow(2).mean(dim=(2, 3, 4), keepdim=True) + 1e-5)).reshape(3, 16, 5, 5)
    expected = expected * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1], rtol=1e-6, atol=1e-6)  # batch-free: an image's output ignores its batch mates
    fixed_cfg = config.replace(config.RunConfig(), **{"norm.name": NAME, "norm.options": {"groups": 2, "affine": False}})
    fixed = create_norm(16, NormSpec(fixed_cfg.norm))
    assert list(fixed.parameters()) == []


def test_example_norm_builds_in_resnet50_and_its_mistakes_are_one_line(my_norm_module) -> None:
    check_model_norm(config.load(EXAMPLES / "one_run.yaml", [f"norm.name={NAME}"]))  # G=32 divides every ResNet-50 width
    with pytest.raises(NormError, match=r"^norm.name: building 'my_norm:my_norm' layers failed: "
                                        r"ValueError: norm.options.groups=32 does not divide a layer's 8 channels$"):
        check_model_norm(tiny(f"norm.name={NAME}"))
    with pytest.raises(NormError, match=r"unknown option\(s\) group; my_norm takes groups, affine$"):
        check_model_norm(tiny(f"norm.name={NAME}", "norm.options={group: 4}"))


@pytest.mark.slow
def test_example_sweep_trains_and_reports_beside_bn_and_gn(tiny_data: Path, tmp_path: Path, cli_env: dict[str, str]) -> None:
    """The example on two points of its curve (8 and 2 images per GPU), the tiny model and data, the local executor."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["grid"]["batch_per_gpu"] = [8, 2]  # the axes cannot be overridden; the rest shrinks by overrides below
    spec["conditions"] = [
        {"when": {"norm.name": "gn"}, "grid": {"norm.groups": [4]}},
        {"when": {"norm.name": NAME}, "grid": {"norm.options": [{"groups": 4, "affine": True}]}},
    ]
    path = tmp_path / "my_norm.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**cli_env, "PYTHONPATH": os.pathsep.join([cli_env["PYTHONPATH"], str(EXAMPLES)])}
    results, out = tmp_path / "results", tmp_path / "report"
    proc = ablation(["sweep", str(path), f"data.root={tiny_data}", *TINY, "gpus=4", "epochs=2", "--executor", "local", "--results",
                     str(results)], env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "6 runs: 6 ok"
    rep = ablation(["report", str(results / "my_norm"), "--out", str(out)], env, timeout=900)
    assert rep.returncode == 0, rep.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 6 and set(runs["status"]) == {"ok"} and set(runs["norm"]) == {"bn", "gn", NAME} and not runs["paper_setting"].any()
    finals = {p.parent.name: json.loads(p.read_text())["val_err1"] for p in (results / "runs").glob("*/final.json")}
    cells = pd.read_csv(out / "table_batch_size.csv")
    mine = cells[cells["row"] == NAME].set_index("column")
    for b in (8, 2):
        rid = runs[(runs["norm"] == NAME) & (runs["batch_per_gpu"] == b)]["run_id"].item()
        assert mine.loc[b, "ours_mean"] == pytest.approx(finals[rid])  # the table's number is the run's own
    assert mine.loc[2, "rise"] == pytest.approx(mine.loc[2, "ours_mean"] - mine.loc[8, "ours_mean"]) and pd.isna(mine.loc[2, "paper_rise"])
    assert cells["delta"].isna().all()  # synthetic data: no Δ against ImageNet
    assert f"| {NAME} | " in rep.stdout and "not in the paper's setting" in rep.stdout
    curves = pd.read_csv(out / "curves.csv")
    assert (curves[curves["variant"] == NAME].groupby("run_id").size() == 2).all()


def test_example_without_its_folder_on_the_path_is_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["sweep", str(EXAMPLE), "--dry-run", "--results", str(tmp_path / "results")], cli_env, timeout=900)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: norm.name: cannot import module 'my_norm' (No module named 'my_norm'); "
                                   "is it installed or on PYTHONPATH?")


# ---------------------------------------------------------------- a user's mistakes


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("nosuchpkg.norms:f", None, r"^norm.name: cannot import module 'nosuchpkg.norms' .*PYTHONPATH\?$"),
        ("plugins.badnorms:missing", None, r"^norm.name: module 'plugins.badnorms' has no callable 'missing'$"),
        ("plugins.badnorms:returns_none", None,
         r"^norm.name: factory 'plugins.badnorms:returns_none' returned NoneType, not a torch.nn.Module$"),
        ("plugins.badnorms:changes_shape", None,
         r"^norm.name: 'plugins.badnorms:changes_shape' changes the tensor's shape at 8 channels: \(2, 8, 4, 4\) -> \(2, 4, 4, 4\)"),
        ("plugins.badnorms:pools", None,
         r"^norm.name: 'plugins.badnorms:pools' changes the tensor's shape at 8 channels: \(2, 8, 4, 4\) -> \(2, 8, 1, 1\)"),
        ("plugins.badnorms:plain_tensor", None,
         r"^norm.name: 'plugins.badnorms:plain_tensor' keeps the tensor 'weight' as a plain attribute, which is never trained"),
        ("plugins.badnorms:claims_affine", None,
         r"^norm.name: 'plugins.badnorms:claims_affine' sets affine=True but has no learnable parameters"),
        ("plugins.badnorms:fixed", {"affine": True},
         r"^norm.name: 'plugins.badnorms:fixed' has no learnable parameters although norm.options.affine is true"),
        ("plugins.badnorms:breaks_in_forward", None,
         r"^norm.name: 'plugins.badnorms:breaks_in_forward' fails on a \(2, 8, 4, 4\) input in train mode: RuntimeError: "),
        ("plugins.badnorms:nans", None,
         r"^norm.name: 'plugins.badnorms:nans' returns NaN or inf on a random \(2, 8, 4, 4\) input in train mode$"),
    ],
)
def test_a_users_mistake_is_one_line_naming_the_norm_before_any_work(name: str, options: dict | None, message: str) -> None:
    cfg = tiny(f"norm.name={name}", *([f"norm.options={json.dumps(options)}"] if options else []))
    with pytest.raises(NormError, match=message) as err:
        check_model_norm(cfg)
    assert "\n" not in str(err.value)


def test_a_norm_without_parameters_is_legal_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    from ablation.norms import checks

    checks._warned.discard("plugins.badnorms:fixed")
    # On the "ablation" logger itself: a trainer run earlier in this process sets propagate=False on it.
    logger = logging.getLogger("ablation")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="ablation"):
            check_model_norm(tiny("norm.name=plugins.badnorms:fixed"))
            check_model_norm(tiny("norm.name=plugins.badnorms:fixed", "batch_per_gpu=4"))
        # one record may reach the handler twice (here and through the root logger): count records, not deliveries
        said = list({id(r): r.getMessage() for r in caplog.records if "has no learnable parameters" in r.getMessage()}.values())
        assert len(said) == 1 and "plugins.badnorms:fixed" in said[0] and "legal" in said[0]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ablation"):
            check_model_norm(tiny("norm.name=none"))  # the built-in identity: no parameters, no claim, no warning (not a user's norm)
        assert not [r for r in caplog.records if "has no learnable" in r.getMessage()]
    finally:
        logger.removeHandler(caplog.handler)


def test_a_bad_user_norm_in_a_sweep_exits_2_with_one_line_and_writes_nothing(tiny_data: Path, tmp_path: Path,
                                                                             cli_env: dict[str, str]) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"name": "bad", "base": {"gpus": 4, "epochs": 1},
                                    "grid": {"norm.name": ["gn", "plugins.badnorms:changes_shape"]}}))
    proc = ablation(["sweep", str(spec), f"data.root={tiny_data}", *TINY, "norm.groups=4", "--executor", "local", "--results",
                     str(tmp_path / "results")], cli_env, timeout=900)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: norm.name: 'plugins.badnorms:changes_shape' changes the tensor's shape at 8 channels")
    assert not (tmp_path / "results").exists()
