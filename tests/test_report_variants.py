"""Report: variants beside their reference numbers (BRN at 4 images per GPU, GN+WS), and the two ways of
comparing with the paper: levels in the paper's setting, shapes (rises over a row's largest batch) elsewhere.

Run folders are written by hand (config.yaml, metrics.jsonl, final.json: all the aggregator reads), so
these tests hold whether or not the brn norm and the model.weight_std field are in this checkout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from helpers import PAPER_BN, PAPER_GN, ablation, curve, imagenet_counts, med, write_run

from ablation import config, rundir
from ablation.results import report
from ablation.results.collect import collect, unlike_paper

IMAGENET = config.IMAGENET_TRAIN_IMAGES
SMALL_MODEL = {"name": "resnet18", "widths": [8, 16, 16, 16], "stem_width": 8, "stem": "small"}


def write_raw_run(root: Path, changes: dict[str, Any], val: list[float], train_images: int = IMAGENET, status: str = "ok", *,
                  paper: bool = False) -> Path:
    """A run folder whose config.yaml is the default config with dotted `changes` written in as they are
    (no validation: a norm or field this checkout may not know yet); 10 epochs unless `paper` (the paper's recipe, 100)."""
    doc = config.to_dict(config.load(None, [] if paper else ["epochs=10"]))
    for key, value in changes.items():
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = copy.deepcopy(value)
    digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:10]
    rid = f"{doc['model']['name']}_{doc['norm']['name']}_b{doc['batch_per_gpu']}x{doc['gpus']}_s{doc['seed']}_{digest}"
    folder = root / rid
    folder.mkdir(parents=True)
    counts = imagenet_counts() if train_images == IMAGENET else imagenet_counts(train_images, 10 * 100, 10)  # synthetic: 10 classes
    derived = {"global_batch": doc["gpus"] * doc["batch_per_gpu"], **counts}
    (folder / "config.yaml").write_text(yaml.safe_dump({"run_id": rid, "config_hash": digest, **doc, "derived": derived}))
    rows = [{"epoch": i + 1, "lr": 0.1, "train_loss": 1.0, "train_err1": v + 1, "val_err1": v, "val_err5": v / 3, "images_per_s": 100.0,
             "epoch_seconds": 1.0, "wall_seconds": i + 1.0} for i, v in enumerate(val)]
    rundir.write_jsonl(folder / "metrics.jsonl", rows)
    rundir.write_json(folder / "final.json", {"status": status, "reason": None,
                                               "val_err1": statistics.median(val[-5:]) if status == "ok" else None,
                                               "val_err5": 1.0, "gpu_hours": 0.5, "wall_seconds": 3.0})
    return folder


def table(rep: report.Report, name: str) -> report.Table:
    return next(t for t in rep.tables if t.name == name)


# ---------------------------------------------------------------- the paper's setting: variants and their references


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> report.Report:
    """Runs in the paper's setting (its recipe, ImageNet-1k): BN, GN, BRN (the paper's limits, and other limits) at 4;
    GN+WS at 32 and 2 on ResNet-50 and -101."""
    root = tmp_path_factory.mktemp("variants") / "runs"
    write_raw_run(root, {"norm.name": "bn", "batch_per_gpu": 4}, curve(28.0), paper=True)
    write_raw_run(root, {"norm.name": "gn", "norm.groups": 32, "batch_per_gpu": 4}, curve(24.5), paper=True)
    write_raw_run(root, {"norm.name": "brn", "norm.r_max": 1.5, "norm.d_max": 0.5, "batch_per_gpu": 4}, curve(26.0), paper=True)
    write_raw_run(root, {"norm.name": "brn", "norm.r_max": 3.0, "norm.d_max": 5.0, "batch_per_gpu": 4}, curve(27.0), paper=True)
    for model in ("resnet50", "resnet101"):
        for b, end in ((32, 23.5), (2, 23.9)):
            write_raw_run(root, {"norm.name": "gn", "norm.groups": 32, "model.weight_std": True, "model.name": model, "batch_per_gpu": b},
                          curve(end - (model == "resnet101")), paper=True)
    return report.build([root.parent], tmp_path_factory.mktemp("variants_report"), ["bn", "gn"])


def test_variant_rows_are_named_by_their_fields(variants: report.Report) -> None:
    runs = variants.runs
    assert len(runs) == 8 and set(runs["status"]) == {"ok"} and runs["paper_setting"].all()
    brn = runs[runs["norm"] == "brn"].sort_values("r_max")
    assert list(brn["r_max"]) == [1.5, 3.0] and list(brn["d_max"]) == [0.5, 5.0]
    assert brn["variant"].str.contains(r"\(r_max=1\.5, d_max=0\.5\)").tolist() == [True, False]  # two limits: two rows, never pooled
    ws = runs[runs["weight_std"]]
    assert len(ws) == 4 and set(ws["variant"]) == {"GN+WS (G=32)"} and set(runs[~runs["weight_std"]]["variant"]) >= {"BN", "GN (G=32)"}
    assert set(runs["setting"]) == {""}  # WS is in the variant's name, r_max/d_max too: nothing else sets runs apart


def test_brn_at_4_images_per_gpu_sits_beside_the_gn_papers_batch_renorm_number(variants: report.Report) -> None:
    t = table(variants, "table_batch_size")
    brn = next(r for r in t.rows if "r_max=1.5" in r)
    other = next(r for r in t.rows if "r_max=3" in r)
    cell = t.cells[(brn, "4")]
    assert cell.paper == 26.3 and cell.comparable and cell.delta == pytest.approx(med(26.0) - 26.3)
    assert cell.text() == f"{med(26.0):.2f} (26.3, {med(26.0) - 26.3:+.2f})"
    assert t.cells[(other, "4")].paper is None  # other limits: not the paper's setting for BR, no number
    assert t.cells[("BN [resnet50]", "4")].paper == 27.3 and t.cells[("GN (G=32) [resnet50]", "4")].paper == 24.2


def test_gn_ws_is_compared_with_the_ws_authors_numbers_marked_as_another_recipe(variants: report.Report) -> None:
    t = table(variants, "table_batch_size")
    r50, r101 = "GN+WS (G=32) [resnet50]", "GN+WS (G=32) [resnet101]"
    for b, end in ((32, 23.5), (2, 23.9)):
        c50, c101 = t.cells[(r50, str(b))], t.cells[(r101, str(b))]
        # batch-independent: the same number at 32 and 2
        assert c50.paper == 23.72 and c50.recipe and c50.delta == pytest.approx(med(end) - 23.72)
        assert c101.paper == 22.10 and c101.delta == pytest.approx(med(end - 1) - 22.10)
        assert c50.text() == f"{med(end):.2f} (23.72‡, {med(end) - 23.72:+.2f})"
    assert "‡ another recipe: GN+WS (Qiao et al.): 90 epochs" in t.caption and ", in the paper's setting" in t.caption
    assert "$^\\ddagger$" in t.latex()
    gn = t.cells.get(("GN (G=32) [resnet50]", "4"))
    assert gn is not None and gn.paper == 24.2 and not gn.recipe  # plain GN never takes GN+WS's number, nor the reverse


# ---------------------------------------------------------------- elsewhere: shapes, not levels


def demo_like(root: Path, values: dict[str, dict[int, float]], train_images: int = 10 * 512) -> None:
    """Runs of a small model on a synthetic dataset with the given paper metric per norm and batch."""
    for norm, by_batch in values.items():
        for b, end in by_batch.items():
            extra = {"norm.groups": 8} if norm == "gn" else {}
            write_raw_run(root, {"norm.name": norm, "batch_per_gpu": b, "model": SMALL_MODEL, "data.image_size": 32, **extra}, curve(end),
                          train_images)


DEMO = {"bn": {32: 0.40, 16: 0.22, 8: 0.45, 4: 4.95, 2: 60.92}, "gn": {32: 1.07, 16: 0.67, 8: 0.40, 4: 0.15, 2: 0.55}}


def test_synthetic_runs_compare_rises_not_levels(tmp_path: Path) -> None:
    demo_like(tmp_path / "runs", DEMO)
    rep = report.build([tmp_path], tmp_path / "out", ["bn", "gn"])
    t = table(rep, "table_batch_size")
    assert not rep.runs["paper_setting"].any()
    assert set(rep.runs["unlike_paper"]) == {"10 classes, 5,120 train and 1,000 val images, not ImageNet-1k; "
                                             "model resnet18 (own widths, stem_width, stem), not ResNet-50/101; "
                                             "10 epochs, not 100; 32-px images, not 224"}
    bn = {b: med(v) for b, v in DEMO["bn"].items()}
    assert t.cells[("BN", "32")].text() == f"{bn[32]:.2f} (base)"
    for b in (16, 8, 4, 2):
        cell = t.cells[("BN", str(b))]
        assert cell.delta is None and cell.rise == pytest.approx(bn[b] - bn[32])
        assert cell.paper_rise == pytest.approx(PAPER_BN[b] - PAPER_BN[32])
        assert cell.text() == f"{bn[b]:.2f} ({bn[b] - bn[32]:+.2f}, paper {PAPER_BN[b] - PAPER_BN[32]:+.1f})"
    assert t.cells[("BN", "2")].text().endswith("paper +11.1)")  # the demo's BN: our rise beside the paper's 34.7 - 23.6
    gn2 = t.cells[("GN (G=8)", "2")]  # the paper's GN is G=32: its curve stands for the shape of any G
    assert gn2.paper_rise == pytest.approx(PAPER_GN[2] - PAPER_GN[32]) and gn2.rise == pytest.approx(med(0.55) - med(1.07))
    md = t.markdown()
    assert "not in the paper's setting (10 classes, 5,120 train and 1,000 val images, not ImageNet-1k; model resnet18" in t.caption
    assert "levels are not comparable" in t.caption
    assert "rise over the row's base" in t.caption
    assert "(23.6" not in md and "(34.7" not in md  # no ImageNet level beside synthetic data
    long = t.long()
    assert long["delta"].isna().all() and long[long["column"] == "2"]["paper_rise"].notna().all()
    norms = table(rep, "table_norms")
    assert norms.cells[("BN", "error")].text() == f"{bn[32]:.2f}"
    assert norms.extra[("GN (G=8)", "Δ vs BN")] == f"{med(1.07) - bn[32]:+.2f} (paper {PAPER_GN[32] - PAPER_BN[32]:+.1f})"
    assert (tmp_path / "out" / "fig_error_vs_batch.png").stat().st_size > 0


def test_the_base_is_the_largest_batch_that_finished(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_raw_run(root, {"norm.name": "bn", "batch_per_gpu": 32, "model": SMALL_MODEL}, [90.0], 512, status="diverged")
    for b, end in ((8, 30.0), (2, 50.0)):
        write_raw_run(root, {"norm.name": "bn", "batch_per_gpu": b, "model": SMALL_MODEL}, curve(end), 512)
    t = report.batch_size_table(collect([root])[0], report.load_reference(report.reference_dir()))
    assert t.cells[("BN", "32")].text() == f"diverged (paper {23.6 - 24.8:+.1f})"  # no ImageNet level, no rise of ours: it has no number
    assert t.cells[("BN", "8")].text() == f"{med(30.0):.2f} (base)"
    assert t.cells[("BN", "2")].text() == f"{med(50.0):.2f} ({med(50.0) - med(30.0):+.2f}, paper {34.7 - 24.8:+.1f})"


def test_a_table_with_both_kinds_of_rows_says_which_is_which(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for b in (32, 2):
        write_run(root, ["norm.name=bn", f"batch_per_gpu={b}"], curve(PAPER_BN[b] + 1.0), paper=True)  # the paper's recipe, ImageNet-1k
        write_run(root, ["norm.name=gn", f"batch_per_gpu={b}", "model.widths=[64,128,256,512]", "model.stem_width=32"], curve(20.0 + b / 8),
                  train_images=IMAGENET, paper=True)
    runs, _ = collect([root])
    t = report.batch_size_table(runs, report.load_reference(report.reference_dir()))
    bn, gn = (next(r for r in t.rows if r.startswith(v)) for v in ("BN", "GN"))
    assert t.cells[(bn, "2")].text() == f"{med(PAPER_BN[2] + 1.0):.2f} (34.7, {med(PAPER_BN[2] + 1.0) - 34.7:+.2f})"
    assert t.cells[(gn, "2")].paper_rise == pytest.approx(0.0) and not t.cells[(gn, "2")].comparable
    assert "Rows in the paper's setting: ours (paper, Δ" in t.caption
    assert f"Rows not in it ({gn}: resnet50 with its own widths, stem_width)" in t.caption


def test_group_table_off_imagenet_compares_rises_over_the_largest_g(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    ends = {8: 30.0, 4: 31.0, 2: 33.0}
    for g, end in ends.items():
        write_raw_run(root, {"norm.name": "gn", "norm.groups": g, "model": SMALL_MODEL}, curve(end), 512)
    write_raw_run(root, {"norm.name": "ln", "model": SMALL_MODEL}, curve(36.0), 512)
    rep = report.build([tmp_path], tmp_path / "out", ["bn", "gn"])
    t = table(rep, "table_groups")
    assert t.columns == ["8", "4", "2", "1"] and t.cells[("GN", "8")].text() == f"{med(30.0):.2f} (base)"
    paper = {8: 24.4, 4: 24.6, 2: 24.7, 1: 25.3}  # Table 3, top half (1 = LN)
    for g, end in [*ends.items(), (1, 36.0)]:
        if g != 8:
            cell = t.cells[("GN", str(g))]
            assert cell.rise == pytest.approx(med(end) - med(30.0)) and cell.paper_rise == pytest.approx(paper[g] - paper[8])
    assert "largest number of groups" in t.caption and "(24.4" not in t.markdown()
    assert (tmp_path / "out" / "fig_error_vs_batch.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("changes", "images", "unlike"),
    [
        ({}, IMAGENET, ""),
        ({}, IMAGENET - 50, ""),  # a copy missing a few images is still ImageNet
        ({"model.name": "resnet101"}, IMAGENET, ""),
        ({}, 128_116, "128,116 train images, not ImageNet-1k's 1,281,167"),
        ({"model.name": "resnet18"}, IMAGENET, "model resnet18, not ResNet-50/101"),
        ({"model.layers": [1, 1, 1, 1]}, IMAGENET, "resnet50 with its own layers"),
        ({"model.name": "resnet101", "model.stem_width": 32}, IMAGENET, "resnet101 with its own stem_width"),
        ({"data.image_size": 128}, IMAGENET, "128-px images, not 224"),
    ],
)
def test_the_paper_setting_is_imagenet_1k_data_and_the_papers_recipe(changes: dict, images: int, unlike: str) -> None:
    doc = config.to_dict(config.load(None, []))
    for key, value in changes.items():
        section, leaf = key.split(".")
        doc[section][leaf] = value
    assert unlike_paper({**doc, "derived": imagenet_counts(images)}) == unlike
    # a run folder that does not say what it trained on is never compared by level
    assert unlike_paper(doc).startswith("data not known to be ImageNet-1k (class, train-image and val-image counts not recorded)")


# ---------------------------------------------------------------- what sets runs apart


def test_norm_fields_that_vary_within_a_norm_split_rows_and_those_between_norms_do_not(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_run(root, ["norm.name=bn"], curve(24.0))
    write_run(root, ["norm.name=bn", "norm.momentum=0.2"], curve(26.0))
    write_run(root, ["norm.name=plugins.mynorms:rms_norm", "norm.options={scale: 2.0}"], curve(27.0))
    write_run(root, ["norm.name=plugins.mynorms:rms_norm"], curve(28.0))
    write_run(root, ["norm.name=ln", "norm.eps=1e-6"], curve(25.0))  # ε differs from BN's, but only between norms
    write_raw_run(root, {"norm.name": "brn", "norm.r_max": 1.5, "norm.d_max": 0.5}, curve(24.5))
    runs, _ = collect([root])
    got = {(v, s) for v, s in zip(runs["variant"], runs["setting"])}
    assert ("BN", "norm.momentum=0.1") in got and ("BN", "norm.momentum=0.2") in got  # never pooled as two seeds
    assert {s for v, s in got if v == "plugins.mynorms:rms_norm"} == {'norm.options={"scale": 2}', "norm.options={}"}
    assert {s for v, s in got if v in ("LN",) or v.startswith("brn") or v.startswith("BR")} == {""}
    t = report.batch_size_table(runs, report.load_reference(report.reference_dir()))
    assert len(t.rows) == 6 and all(c.n == 1 for c in t.cells.values())


def test_reference_files_carry_provenance_and_variant_rows() -> None:
    ref = report.load_reference(report.reference_dir())
    br = ref[(ref["table"] == "batch_renorm")].set_index("norm")["val_error_pct"].to_dict()
    assert br == {"BRN": 26.3, "BN": 27.3, "GN": 24.2}
    ws = ref[ref["fields"].str.contains("model.weight_std=true")]
    assert sorted(zip(ws["model"], ws["val_error_pct"])) == [("ResNet-101", 22.10), ("ResNet-50", 23.72)]
    assert ws["batch_per_gpu"].isna().all() and (ws["recipe"] != "").all() and ws["source"].str.contains("Qiao").all()
    assert (ref[ref["paper"] == "wu_he_2018_imagenet"]["recipe"] == "").all()  # the GN paper's own recipe: no ‡
    assert report.paper_ref(ref, report.BATCH_TABLES, "resnet50", "gn", 8, 32, run={"weight_std": True}).value == 23.72
    assert report.paper_ref(ref, report.BATCH_TABLES, "resnet50", "gn", 8, 32).value == 24.0
    assert report.paper_ref(ref, report.BATCH_TABLES, "resnet50", "brn", 4, run={"r_max": 1.5, "d_max": 0.5}).value == 26.3
    assert report.paper_ref(ref, report.BATCH_TABLES, "resnet50", "brn", 8, run={"r_max": 1.5, "d_max": 0.5}) is None
    assert report.paper_ref(ref, report.BATCH_TABLES, "resnet18", "bn", 2, loose=False) is None  # strict: the paper has no ResNet-18


def test_report_command_help_runs(cli_env: dict[str, str]) -> None:
    proc = ablation(["report", "--help"], cli_env, timeout=120)
    assert proc.returncode == 0 and "--baseline" in proc.stdout and "--reference" in proc.stdout


def test_runs_csv_has_the_comparability_columns(variants: report.Report) -> None:
    csv = pd.read_csv(next(p for p in variants.files if p.name == "runs.csv"))
    assert {"train_images", "val_images", "num_classes", "paper_setting", "unlike_paper", "deviations", "weight_std", "r_max",
            "d_max"} <= set(csv.columns)
    assert (csv["train_images"] == IMAGENET).all() and (csv["val_images"] == 50_000).all() and (csv["num_classes"] == 1000).all()
    assert csv["paper_setting"].all() and csv["deviations"].isna().all()  # none: empty
