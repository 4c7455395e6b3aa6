"""Report: the paper's recipe as data (which runs are in the paper's setting, and how the others differ), the
uncertainty of the numbers (mean ± std (n) over seeds, error bars, the binomial noise floor of one seed), Figure 5."""

from __future__ import annotations

import dataclasses
import math
import statistics
import typing
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from helpers import PAPER_BN, PAPER_GN, curve, imagenet_counts, med, write_run
from test_report_variants import write_raw_run

from ablation import config
from ablation.results import recipe, report
from ablation.results.collect import collect, result_fields

IMAGENET = config.IMAGENET_TRAIN_IMAGES
REF = report.load_reference(report.reference_dir())


def _hashed_defaults(cls: type = config.RunConfig, prefix: str = "") -> dict[str, object]:
    """Every result-affecting (hashed) leaf field of a config dataclass at its default, dotted, in canonical form."""
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("hash", True):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_hashed_defaults(hints[f.name], f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[prefix + f.name] = config.canonical(dict(default) if isinstance(default, typing.Mapping) else default)
    return out


def test_the_recipe_is_runconfigs_defaults() -> None:
    """The recipe file holds every result-affecting field of RunConfig but the swept ones, at its default: the two
    cannot drift apart; and its data are ImageNet-1k's counts."""
    held = recipe.paper_recipe()
    defaults = {k: v for k, v in _hashed_defaults().items() if not recipe.swept(k)}
    assert {k: config.canonical(v) for k, v in held["fields"].items()} == defaults
    assert {k for k in _hashed_defaults() if recipe.swept(k)} == {"seed", "batch_per_gpu", "model.weight_std"} | {
        k for k in _hashed_defaults() if k.startswith(("norm.", "eval."))}
    assert held["dataset"] == {"num_classes": 1000, "train_images": IMAGENET, "val_images": 50_000, "tolerance": 0.01}
    assert held["models"] == ["resnet50", "resnet101"] and held["fields"]["model.name"] == config.RunConfig().model.name
    assert recipe.deviations(result_fields(config.to_dict(config.RunConfig()))) == []


# Each field alone, off the paper's recipe: (override, the caption's words for it).
DEVIATIONS = [
    ("epochs=10", "10 epochs, not 100"),
    ("gpus=1", "1 GPU, not 8"),
    ("optim.schedule=cosine", "cosine schedule, not step"),
    ("optim.milestones=[0.5,0.75]", "LR steps at [0.5, 0.75] of training, not [0.3, 0.6, 0.9]"),
    ("optim.gamma=0.2", "LR step factor 0.2, not 0.1"),
    ("optim.warmup_epochs=5", "5 warm-up epochs, not none"),
    ("optim.lr=0.2", "LR 0.2 at the reference batch, not 0.1"),
    ("optim.reference_batch=512", "LR reference batch 512, not 256"),
    ("optim.momentum=0.8", "momentum 0.8, not 0.9"),
    ("optim.nesterov=false", "no Nesterov momentum"),
    ("optim.weight_decay=5e-5", "weight decay 5e-05, not 0.0001"),
    ("optim.no_decay_1d=true", "no decay on γ, β and biases"),
    ("amp=true", "AMP (bfloat16)"),
    ("tf32=true", "TF32 on, not torch's defaults"),
    ("data.pipeline=split", "split data pipeline, not reference"),
    ("data.image_size=192", "192-px images, not 224"),
    ("data.eval_resize=288", "evaluation resize 288, not 256 (256/224 of the crop)"),
    ("data.crop_scale=[0.35,1]", "own augmentation: crop scale [0.35, 1]"),
    ("data.crop_ratio=[1,1]", "own augmentation: crop ratio [1, 1]"),
    ("data.color_jitter=0", "own augmentation: no colour jitter"),
    ("data.lighting=0", "own augmentation: no PCA lighting"),
    ("data.hflip=false", "own augmentation: no flip"),
    ("data.mean=[0.5,0.5,0.5]", "own augmentation: mean [0.5, 0.5, 0.5]"),
    ("data.std=[0.5,0.5,0.5]", "own augmentation: std [0.5, 0.5, 0.5]"),
    ("model.name=resnet18", "model resnet18, not ResNet-50/101"),
    ("model.layers=[2,2,2,2]", "resnet50 with its own layers"),
    ("model.stem=small", "resnet50 with its own stem"),
    ("model.zero_init_last=false", "no zero γ in each block's last norm"),
    ("model.fc_init_std=0.02", "FC init std 0.02, not 0.01"),
]


@pytest.mark.parametrize(("override", "words"), DEVIATIONS, ids=[o for o, _ in DEVIATIONS])
def test_each_field_off_the_papers_recipe_alone_removes_the_delta_and_is_named(override: str, words: str, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for b in (32, 2):
        write_run(root, ["norm.name=bn", f"batch_per_gpu={b}", override], curve(PAPER_BN[b] + 1.0), paper=True)
    runs, _ = collect([root])
    key = override.split("=", 1)[0]
    assert not runs["paper_setting"].any() and set(runs["unlike_paper"]) == {words}
    assert {d.split("=", 1)[0] for d in runs["deviations"]} == {key}  # runs.csv: the field, by name
    t = report.batch_size_table(runs, REF)
    assert all(c.delta is None and not c.comparable for c in t.cells.values())
    assert f"not in the paper's setting ({words}), so levels are not comparable" in t.caption
    assert t.cells[("BN", "32")].text() == f"{med(PAPER_BN[32] + 1.0):.2f} (base)"  # rises, as the demo shows them


def test_a_run_of_the_papers_recipe_on_imagenet_1k_keeps_ours_paper_delta(tmp_path: Path) -> None:
    """The paper's recipe, its swept axes at any value (norm and its options, images per GPU, seed, ResNet-101, GN+WS), an
    explicit evaluation resize of 256 at 224 px (the same as none) and a copy of ImageNet missing a few images: in it."""
    root = tmp_path / "runs"
    for b in (32, 2):
        write_run(root, ["norm.name=bn", f"batch_per_gpu={b}", "data.eval_resize=256"], curve(PAPER_BN[b] + 1.0),
                  train_images=IMAGENET - 50, paper=True)
        write_run(root, ["norm.name=gn", f"batch_per_gpu={b}", "seed=3", "norm.eps=1e-4"], curve(PAPER_GN[b]), paper=True)
    write_run(root, ["norm.name=gn", "norm.groups=16", "model.name=resnet101", "model.weight_std=true"], curve(22.0), paper=True)
    runs, _ = collect([root])
    assert runs["paper_setting"].all() and (runs["unlike_paper"] == "").all() and (runs["deviations"] == "").all()
    t = report.batch_size_table(runs, REF)
    bn = next(r for r in t.rows if r.startswith("BN"))
    assert t.cells[(bn, "2")].text() == f"{med(PAPER_BN[2] + 1.0):.2f} (34.7, {med(PAPER_BN[2] + 1.0) - 34.7:+.2f})"
    assert t.caption.startswith("Top-1 val error (%) vs images per GPU, in the paper's setting (ImageNet-1k, the paper's recipe): ")


@pytest.mark.parametrize(
    ("counts", "words"),
    [
        (imagenet_counts(num_classes=100), "100 classes, not ImageNet-1k's 1,000"),
        (imagenet_counts(val_images=10_000), "10,000 val images, not ImageNet-1k's 50,000"),
        (imagenet_counts(num_classes=100, val_images=5_000), "100 classes, 5,000 val images, not ImageNet-1k"),
        (imagenet_counts(128_116, 5_000, 100), "100 classes, 128,116 train and 5,000 val images, not ImageNet-1k"),
        (imagenet_counts(val_images=None, num_classes=None), "data not known to be ImageNet-1k (class and val-image counts not recorded)"),
        (imagenet_counts(val_images=None), "data not known to be ImageNet-1k (val-image count not recorded)"),
    ],
)
def test_imagenet_1k_is_known_by_its_classes_train_and_val_images(counts: dict, words: str, tmp_path: Path) -> None:
    """ImageNet-1k's train count is not enough: 1,000 classes and 50,000 val images too, as the trainer records them."""
    root = tmp_path / "runs"
    write_run(root, ["norm.name=bn"], curve(24.0), train_images=counts.get("train_images"), paper=True,
              val_images=counts.get("val_images"), num_classes=counts.get("num_classes"))
    runs, _ = collect([root])
    assert not runs["paper_setting"].any() and list(runs["unlike_paper"]) == [words] and list(runs["deviations"]) == [""]
    t = report.batch_size_table(runs, REF)
    assert t.cells[("BN", "32")].delta is None and f"not in the paper's setting ({words})" in t.caption


def test_a_caption_names_each_difference_once_grouped_and_short(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for b in (32, 2):
        write_run(root, ["norm.name=bn", f"batch_per_gpu={b}", "gpus=1", "optim.schedule=cosine", "data.color_jitter=0",
                         "data.lighting=0"], curve(30.0 + b / 8))
        write_run(root, ["norm.name=gn", f"batch_per_gpu={b}", "gpus=1", "optim.schedule=cosine", "data.color_jitter=0",
                         "data.lighting=0"], curve(30.0))
    t = report.batch_size_table(collect([root])[0], REF)
    want = "10 epochs, not 100; 1 GPU, not 8; cosine schedule, not step; own augmentation: no colour jitter, no PCA lighting"
    assert f"not in the paper's setting ({want}), so levels" in t.caption


def test_a_field_this_version_does_not_know_is_a_difference(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_raw_run(root, {"norm.name": "bn", "optim.lookahead": 5}, curve(24.0), paper=True)
    runs, _ = collect([root])
    assert list(runs["unlike_paper"]) == ["optim.lookahead=5"] and list(runs["deviations"]) == ["optim.lookahead=5"]


# ---------------------------------------------------------------- uncertainty


def test_several_seeds_read_mean_std_n_in_every_output_and_the_figure_has_error_bars(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    ends = [24.0, 24.6, 23.7]
    for seed, end in enumerate(ends):
        write_run(root, ["norm.name=bn", "batch_per_gpu=32", f"seed={seed}"], curve(end), paper=True)
        write_run(root, ["norm.name=bn", "batch_per_gpu=2", f"seed={seed}"], curve(end + 11), paper=True)
    runs, _ = collect([root])
    values = [med(e) for e in ends]
    mean, std = statistics.mean(values), statistics.stdev(values)
    t = report.batch_size_table(runs, REF)
    cell = t.cells[("BN", "32")]
    assert (cell.n, cell.mean, cell.std) == (3, pytest.approx(mean), pytest.approx(std))
    assert cell.text() == f"{mean:.2f} ± {std:.2f} (n=3) (23.6, {mean - 23.6:+.2f})"
    assert cell.text() in t.markdown() and rf"{mean:.2f} $\pm$ {std:.2f} (n=3)" in t.latex()
    long = t.long().set_index("column")
    assert long.loc["32", "ours_std"] == pytest.approx(std) and long.loc["32", "n"] == 3
    assert t.footer == "" and "noise floor" not in t.markdown()  # every cell has its seeds' spread
    fig = report.error_vs_batch_figure(runs, REF)
    try:
        bars = [c for c in fig.axes[0].containers if c.has_yerr]
        assert len(bars) == 1
        spans = sorted((seg[1][1] - seg[0][1]) / 2 for seg in bars[0].lines[2][0].get_segments())
        stds = sorted([std, statistics.stdev([med(e + 11) for e in ends])])
        assert spans == pytest.approx(stds)
    finally:
        plt.close(fig)


def test_the_binomial_noise_floor_of_one_seed_is_stated_under_the_table(tmp_path: Path) -> None:
    assert round(report.noise_floor(24.0, 50_000), 2) == 0.19  # statistics.md: ≈ 0.19 points at 24 % on 50,000
    root = tmp_path / "runs"
    ends = {32: 24.0, 8: 24.5, 2: 30.0}
    for b, end in ends.items():
        write_run(root, ["norm.name=gn", f"batch_per_gpu={b}"], curve(end), paper=True)
    rep = report.build([root.parent], tmp_path / "out")
    t = next(t for t in rep.tables if t.name == "table_batch_size")
    err = statistics.median(med(e) for e in ends.values())
    floor = 100 * math.sqrt(err / 100 * (1 - err / 100) / 50_000)
    line = f"one seed per cell: the binomial noise floor of 50,000 validation images is ±{floor:.2f} points at {err:.1f} % error"
    assert t.footer == line
    assert t.markdown().endswith(f"\n_{line}_\n") and t.latex().endswith(f"\\end{{tabular}}\n% {line}\n")
    assert (tmp_path / "out" / "table_batch_size.md").read_text().endswith(f"_{line}_\n")
    norms = next(t for t in rep.tables if t.name == "table_norms")
    assert norms.footer.startswith("one seed per cell: the binomial noise floor of 50,000 validation images is ±")


def test_the_noise_floor_of_runs_that_do_not_record_their_validation_set_is_unknown(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, ["norm.name=bn"], curve(24.0), val_images=None)
    t = report.batch_size_table(collect([root])[0], REF)
    assert t.footer == "one seed per cell: the binomial noise floor of the validation set is unknown (the runs do not record its size)"


# ---------------------------------------------------------------- Figure 5


@pytest.fixture(scope="module")
def epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BN and GN at 32, 8 and 2 images per GPU (BN at 2 diverged), LN at 32: curves of 12 epochs."""
    root = tmp_path_factory.mktemp("epochs") / "runs"
    for b in (32, 8, 2):
        if b == 2:
            write_run(root, ["norm.name=bn", "batch_per_gpu=2"], [80.0, 90.0], status="diverged", reason="loss is nan", paper=True)
        else:
            write_run(root, ["norm.name=bn", f"batch_per_gpu={b}"], curve(PAPER_BN[b], 12), paper=True)
        write_run(root, ["norm.name=gn", f"batch_per_gpu={b}"], curve(PAPER_GN[b], 12), paper=True)
    write_run(root, ["norm.name=ln", "batch_per_gpu=32"], curve(25.3, 12), paper=True)
    return root.parent


def test_figure_5_has_one_panel_per_norm_bn_and_gn_first_and_one_curve_per_batch(epochs: Path) -> None:
    runs, curves = collect([epochs])
    fig = report.val_error_vs_epoch_figure(runs.iloc[::-1], curves)  # the runs in any order: BN, then GN, then the others
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert [ax.get_title() for ax in axes] == ["BN", "GN (G=32)", "LN"]
        labels = [[line.get_label() for line in ax.get_lines()] for ax in axes]
        assert labels == [["32 images/GPU", "8 images/GPU", "2 images/GPU (diverged)"],
                          ["32 images/GPU", "8 images/GPU", "2 images/GPU"], ["32 images/GPU"]]
        gn8 = axes[1].get_lines()[1]
        assert list(gn8.get_xdata()) == list(range(1, 13)) and list(gn8.get_ydata()) == pytest.approx(curve(PAPER_GN[8], 12))
        assert axes[0].get_lines()[0].get_color() == axes[1].get_lines()[0].get_color()  # a batch size keeps its colour
        assert all(ax.get_xlabel() == "epoch" for ax in axes) and axes[0].get_ylabel() == "val error (%)"
    finally:
        plt.close(fig)


def test_figure_5_is_written_and_a_warm_report_keeps_it(epochs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = report.build([epochs], out)
    names = [p.name for p in first.files]
    assert {"fig_val_error_vs_epoch.png", "fig_val_error_vs_epoch.pdf", "fig_curves.png"} <= set(names)
    png, pdf = out / "fig_val_error_vs_epoch.png", out / "fig_val_error_vs_epoch.pdf"
    assert png.read_bytes().startswith(b"\x89PNG") and pdf.read_bytes().startswith(b"%PDF")
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (png, pdf)}
    again = report.build([epochs], out)  # nothing changed: nothing read or written, the files listed as they are
    assert again._made is None and [p.name for p in again.files] == names
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (png, pdf)} == stamps
    png.unlink()  # an output gone: made again
    assert "fig_val_error_vs_epoch.png" in [p.name for p in report.build([epochs], out).files] and png.stat().st_size > 0
