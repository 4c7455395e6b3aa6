"""Run config: the paper's recipe as defaults, strict loading, typed overrides, run ids, derived values."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ablation import config
from ablation.config import ConfigError, RunConfig
from ablation.train.optim import lr_at


def test_defaults_are_the_papers_recipe() -> None:
    cfg = RunConfig()
    assert (cfg.gpus, cfg.batch_per_gpu, cfg.epochs) == (8, 32, 100)
    assert (cfg.model.name, cfg.model.zero_init_last, cfg.model.fc_init_std) == ("resnet50", True, 0.01)
    assert (cfg.norm.name, cfg.norm.eps, cfg.norm.momentum) == ("bn", None, 0.1)
    assert config.normalized(cfg).norm.eps == 1e-5  # the paper default, resolved by the registry
    o = cfg.optim
    assert (o.lr, o.reference_batch, o.momentum, o.nesterov, o.weight_decay, o.no_decay_1d) == (0.1, 256, 0.9, True, 1e-4, False)
    assert (o.schedule, o.milestones, o.gamma, o.warmup_epochs) == ("step", (0.3, 0.6, 0.9), 0.1, 0.0)
    d = cfg.data
    assert (d.image_size, d.crop_scale, d.color_jitter, d.lighting, d.hflip) == (224, (0.08, 1.0), 0.4, 0.1, True)
    assert d.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert config.derive(cfg).eval_resize == 256
    assert cfg.metric_epochs == 5


@pytest.mark.parametrize(("batch_per_gpu", "lr"), [(32, 0.1), (16, 0.05), (8, 0.025), (4, 0.0125), (2, 0.00625)])
def test_lr_is_point_one_times_n_over_32_on_eight_gpus(batch_per_gpu: int, lr: float) -> None:
    d = config.derive(config.load(None, [f"batch_per_gpu={batch_per_gpu}"]))
    assert d.lr == pytest.approx(lr)
    assert d.global_batch == 8 * batch_per_gpu


def test_schedule_keeps_epochs_fixed_so_small_batches_take_more_steps() -> None:
    big = config.derive(config.load(None, ["batch_per_gpu=32"]), train_images=1_281_167)
    small = config.derive(config.load(None, ["batch_per_gpu=2"]), train_images=1_281_167)
    assert big.steps_per_epoch == 1_281_167 // 256 and small.steps_per_epoch == 1_281_167 // 16
    assert big.milestone_steps == tuple(round(f * big.total_steps) for f in (0.3, 0.6, 0.9))
    cfg = config.load(None, ["epochs=10"])
    d = config.derive(cfg, train_images=2560)  # 10 steps per epoch, 100 steps
    lrs = [lr_at(cfg, d, s) for s in range(d.total_steps)]
    assert lrs[0] == lrs[29] == pytest.approx(0.1) and lrs[30] == pytest.approx(0.01)
    assert lrs[60] == pytest.approx(0.001) and lrs[99] == pytest.approx(0.0001)


def test_warmup_and_cosine() -> None:
    cfg = config.load(None, ["epochs=4", "optim.warmup_epochs=1", "optim.schedule=cosine"])
    d = config.derive(cfg, train_images=256 * 10)
    assert lr_at(cfg, d, 0) == pytest.approx(0.01) and lr_at(cfg, d, 9) == pytest.approx(0.1)
    assert lr_at(cfg, d, 39) < 0.001


def test_too_few_images_for_one_global_batch() -> None:
    with pytest.raises(ConfigError, match="100 training images cannot fill one global batch of 256"):
        config.derive(RunConfig(), train_images=100)


def test_overrides_are_typed() -> None:
    cfg = config.load(None, ["norm.name=gn", "norm.groups=16", "optim.weight_decay=5e-5", "data.crop_scale=0.2,1", "amp=true",
                             "model.widths=[8,16,32,64]"])
    assert cfg.norm.groups == 16 and cfg.optim.weight_decay == 5e-5 and cfg.data.crop_scale == (0.2, 1.0)
    assert cfg.amp is True and cfg.model.widths == (8, 16, 32, 64)
    assert config.load(None, ["model.widths=null"]).model.widths is None


def test_yaml_file_plus_overrides(tmp_path) -> None:
    p = tmp_path / "run.yaml"
    p.write_text("batch_per_gpu: 4\nnorm:\n  name: gn\n  groups: 8\n")
    cfg = config.load(p, ["batch_per_gpu=2"])
    assert (cfg.batch_per_gpu, cfg.norm.name, cfg.norm.groups) == (2, "gn", 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["norm.group=3"], r"unknown config key 'norm.group' \(did you mean 'norm.groups'\?\); valid: norm\.\{name, groups"),
        (["norm.nme=gn", "epocs=3"], r"unknown config keys 'norm.nme' \(did you mean 'norm.name'\?\), 'epocs' \(did you mean 'epochs'\?\)"),
        (["norm.nme=gn"], r"unknown config key 'norm.nme' \(did you mean 'norm.name'\?\)"),
        (["batch_per_gpux=2"], r"unknown config key 'batch_per_gpux' \(did you mean 'batch_per_gpu'\?\)"),
        (["batchsize=3"], r"unknown config key 'batchsize'.*valid: gpus, batch_per_gpu"),
        (["batch_per_gpu=2.5"], "batch_per_gpu: expected int, got 2.5"),
        (["batch_per_gpu=0"], "batch_per_gpu must be > 0"),
        (["gpus=-1"], "gpus must be > 0"),
        (["epochs=ten"], "epochs: expected int, got 'ten'"),
        (["amp=2"], "amp: expected bool"),
        (["norm.name=groupnorm"], "norm.name: unknown norm 'groupnorm'.*valid: bn, syncbn, gn, ln, in, none"),
        (["norm.name=bn", "norm.groups=4"], r"norm.groups applies to gn, evonorm_s0, not .bn."),
        (["norm.name=gn", "norm.groups=4", "norm.channels_per_group=4"], "either norm.groups or norm.channels_per_group"),
        (["norm.running_stats=sum"], "norm.running_stats must be one of rank0, mean"),
        (["optim.milestones=[0.6,0.3]"], "optim.milestones must be increasing"),
        (["optim.schedule=poly"], "optim.schedule must be one of step, cosine"),
        (["data.crop_scale=[0.5,0.1]"], "data.crop_scale"),
        (["model.widths=[8,16]"], "model.widths must be 4"),
        (["model=3"], "model: expected a mapping"),
        (["nonsense"], "is not key=value"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        config.load(None, overrides)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_file(tmp_path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("norm: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        config.load(p)
    p.write_text("norm:\n  nam: gn\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'norm.nam'"):
        config.load(p)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().gpus = 4  # type: ignore[misc]


def test_config_pickles_and_deep_copies_with_norm_options() -> None:
    """A run config (norm.options included) survives pickle and deepcopy equal, with the same run id, and stays read-only."""
    import copy
    import pickle

    cfg = config.load(None, ["norm.name=gn", "norm.options={alpha: 0.5, sizes: [1, 2]}"])
    for twin in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert twin == cfg and config.run_id(twin) == config.run_id(cfg)
        assert dict(twin.norm.options) == {"alpha": 0.5, "sizes": [1, 2]}
    with pytest.raises(TypeError):
        cfg.norm.options["alpha"] = 1.0  # type: ignore[index]


def test_norm_option_names_must_be_text(tmp_path) -> None:
    """YAML 1.1 reads an unquoted `on:` as True: a one-line error naming the field and the fix, not a crash in the run id."""
    p = tmp_path / "opts.yaml"
    p.write_text("norm:\n  name: gn\n  options:\n    on: 1\n")
    with pytest.raises(ConfigError, match=r"opts.yaml: norm.options: names must be text, got True \(YAML reads an unquoted on/off"):
        config.load(p)
    with pytest.raises(ConfigError, match=r"norm.options: names must be text, got 1$"):
        config.load(None, ["norm.options={1: 2, a: 3}"])
    p.write_text("norm:\n  name: gn\n  options:\n    'on': 1\n")
    assert dict(config.load(p).norm.options) == {"on": 1}


def test_run_id_is_stable_and_names_the_axes() -> None:
    # A golden value: changing it silently orphans every existing run folder.
    assert config.run_id(RunConfig()) == "resnet50_bn_b32x8_s0_8b1f0d60d6"
    gn = config.load(None, ["norm.name=gn", "batch_per_gpu=2"])
    assert config.run_id(gn).startswith("resnet50_gn32_b2x8_s0_")


def test_hash_ignores_fields_that_do_not_change_results() -> None:
    base = config.config_hash(RunConfig())
    for override in ("data.root=/elsewhere", "data.workers=2", "device=cpu", "checkpoint_every_steps=7", "log_steps=true"):
        assert config.config_hash(config.load(None, [override])) == base, override
    for override in ("seed=1", "batch_per_gpu=16", "optim.no_decay_1d=true", "norm.momentum=0.01", "amp=true"):
        assert config.config_hash(config.load(None, [override])) != base, override


def test_equivalent_spellings_share_a_run_id() -> None:
    a = config.load(None, ["norm.name=gn"])
    b = config.load(None, ["norm.name=gn", "norm.groups=32"])
    c = config.load(None, ["norm.name=gn", "optim.lr=1e-1"])
    assert config.run_id(a) == config.run_id(b) == config.run_id(c)
    ln, gn1 = config.load(None, ["norm.name=ln"]), config.load(None, ["norm.name=gn", "norm.groups=1"])
    inorm, cpg1 = config.load(None, ["norm.name=in"]), config.load(None, ["norm.name=gn", "norm.channels_per_group=1"])
    assert config.run_id(ln) == config.run_id(gn1) and config.run_id(ln).startswith("resnet50_ln_")
    assert config.run_id(inorm) == config.run_id(cpg1) and config.run_id(inorm).startswith("resnet50_in_")
    assert config.run_id(config.load(None, ["norm.name=gn", "norm.groups=2"])) != config.run_id(ln)


def test_omit_if_default_keeps_old_run_ids() -> None:
    @dataclasses.dataclass(frozen=True)
    class Later(RunConfig):
        new_knob: int = config._f(0, "added later", omit_if_default=True)

    assert config.hash_view(Later()) == config.hash_view(RunConfig())
    assert config.hash_view(Later(new_knob=1)) != config.hash_view(RunConfig())


def test_data_pipeline_is_in_the_run_id_only_when_split() -> None:
    base = RunConfig()
    assert config.run_id(config.load(None, ["data.pipeline=reference"])) == config.run_id(base)  # old folders keep their ids
    split = config.load(None, ["data.pipeline=split"])
    assert split.data.pipeline == "split" and config.run_id(split) != config.run_id(base)
    assert config.to_dict(base)["data"]["pipeline"] == "reference"  # config.yaml records it either way
    old_yaml = config.to_dict(base)
    del old_yaml["data"]["pipeline"]  # a config.yaml written before the field existed
    assert config.from_dict(old_yaml).data.pipeline == "reference"
    with pytest.raises(ConfigError, match="data.pipeline must be one of reference, split"):
        config.load(None, ["data.pipeline=fast"])


def test_round_trip_through_dict() -> None:
    cfg = config.load(None, ["norm.name=gn", "norm.channels_per_group=16", "model.widths=[8,16,32,64]", "norm.options={a: 1}"])
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_config_module_does_not_import_torch() -> None:
    code = "import sys, ablation.config, ablation.rundir, ablation.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
