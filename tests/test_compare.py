"""`ablation compare` and the report's significance table: the statistics against hand-made cases with known answers,
each refusal's one line, and the table's rows for a small results root."""

from __future__ import annotations

import json
import math
import statistics as pystats
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import ablation, curve, med, write_run

from ablation import cli, rundir
from ablation.results import compare, report
from ablation.results import statistics as st

CLASSES, FINGERPRINT = 10, "a1b2c3d4e5f60718"
MYNORM = "plugins.mynorms:rms_norm"


def pattern(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of two sides with these counts of images both, only A, only B and neither got right."""
    a = np.array([True] * both + [True] * only_a + [False] * only_b + [False] * neither)
    b = np.array([True] * both + [False] * only_a + [True] * only_b + [False] * neither)
    return a, b


def write_predictions(folder: Path, by_epoch: dict[int, np.ndarray], fingerprint: str = FINGERPRINT) -> None:
    """predictions/ as the trainer writes it: labels, one top-5 file per epoch (top-1 right where `correct` says), val.json."""
    n = len(next(iter(by_epoch.values())))
    labels = (np.arange(n) % CLASSES).astype(np.uint16)
    pred = folder / rundir.PREDICTIONS
    pred.mkdir()
    np.save(pred / rundir.LABELS, labels)
    for epoch, ok in by_epoch.items():
        first = np.where(ok, labels, (labels + 1) % CLASSES)
        topk = np.stack([first, *[(labels + j) % CLASSES for j in range(2, 6)]], axis=1).astype(np.uint16)
        np.save(pred / f"epoch_{epoch:03d}.npy", topk)
    (pred / rundir.VAL_META).write_text(json.dumps({"images": n, "classes": CLASSES, "k": 5, "fingerprint": fingerprint}))


def binom_p(b: int, c: int) -> float:
    """The exact two-sided McNemar p by hand: twice the binomial tail at one half, capped at 1."""
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


# ---------------------------------------------------------------- the statistics


def test_mcnemar_counts_and_exact_p_by_hand() -> None:
    a, b = pattern(both=20, only_a=1, only_b=9, neither=5)
    assert st.mcnemar(a, b) == (1, 9, 0.021484375)  # 2 (C(10,0) + C(10,1)) / 2^10
    assert st.mcnemar(b, a) == (9, 1, 0.021484375)
    assert st.mcnemar(*pattern(10, 0, 0, 3)) == (0, 0, 1.0)  # no image on which they differ
    assert st.mcnemar(*pattern(10, 3, 3, 3)) == (3, 3, 1.0)
    for only_a, only_b in ((30, 60), (7, 2), (0, 12), (150, 180)):
        bb, cc, p = st.mcnemar(*pattern(500, only_a, only_b, 100))
        assert (bb, cc) == (only_a, only_b) and p == pytest.approx(binom_p(only_a, only_b), rel=1e-9)


def test_bootstrap_point_estimate_and_reproducibility() -> None:
    a, b = pattern(700, 30, 60, 210)  # A's error 27 %, B's 24 %
    d, lo, hi = st.paired_bootstrap(a, b, draws=2000, seed=3)
    assert d == pytest.approx(3.0) and lo < 3.0 < hi
    assert st.paired_bootstrap(a, b, draws=2000, seed=3) == (d, lo, hi)
    # the standard error of a paired difference of proportions: sqrt((b + c) / n - ((c - b) / n)^2 / ... ) by the delta method
    n, disc, diff = 1000, 90 / 1000, 0.03
    se = math.sqrt((disc - diff**2) / n) * 100
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_draws_the_same_distribution_as_resampling_indices() -> None:
    """The multinomial draw of the distinct per-image differences is a resampling of the images with replacement."""
    rng = np.random.default_rng(7)
    a, b = rng.random(400) < 0.7, rng.random(400) < 0.6
    _, lo, hi = st.paired_bootstrap(a, b, draws=20_000, seed=1)
    idx = rng.integers(0, 400, size=(20_000, 400))
    naive = ((1 - a[idx].mean(axis=1)) - (1 - b[idx].mean(axis=1))) * 100
    nlo, nhi = np.percentile(naive, [2.5, 97.5])
    assert lo == pytest.approx(nlo, abs=0.35) and hi == pytest.approx(nhi, abs=0.35)


def test_bootstrap_interval_contains_the_true_difference_at_its_nominal_rate() -> None:
    """Over 200 validation sets drawn from a known joint law (A right 75 %, B right 70 %: A − B = −5 points), the 95 %
    interval holds the true difference in about 95 % of them."""
    rng = np.random.default_rng(2024)
    probs = [0.65, 0.10, 0.05, 0.20]  # both right, only A, only B, neither
    truth, n, covered = (0.30 - 0.25) * -100, 2000, 0
    for i in range(200):
        kind = rng.choice(4, size=n, p=probs)
        a, b = np.isin(kind, (0, 1)), np.isin(kind, (0, 2))
        _, lo, hi = st.paired_bootstrap(a, b, draws=500, seed=i)
        covered += lo <= truth <= hi
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_seed_aggregation_against_hand_computation() -> None:
    a, b = [24.1, 24.5, 23.9], [25.0, 25.6, 25.2, 24.8]
    s = st.seed_summary(a)
    assert (s.mean, s.std, s.n) == (pytest.approx(pystats.mean(a)), pytest.approx(pystats.stdev(a)), 3)
    assert s.text() == f"{pystats.mean(a):.2f} ± {pystats.stdev(a):.2f} (n=3)"
    one = st.seed_summary([30.0])
    assert one.n == 1 and math.isnan(one.std) and one.text() == "30.00 (n=1)"
    # Welch by hand: the standard error, Welch–Satterthwaite's degrees of freedom, the t quantile
    va, vb = pystats.variance(a) / len(a), pystats.variance(b) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    diff = pystats.mean(a) - pystats.mean(b)
    d = st.seed_difference(a, b)
    assert d.diff == pytest.approx(diff) and d.df == pytest.approx(df)
    assert (d.lo, d.hi) == (pytest.approx(diff - half), pytest.approx(diff + half))
    assert d.p == pytest.approx(2 * t.sf(abs(diff) / math.sqrt(va + vb), df))
    assert st.share_a_beats_b(a, b) == 1.0
    assert st.share_a_beats_b([1.0, 3.0], [2.0, 3.0]) == pytest.approx((1 + 1 + 0 + 0.5) / 4)  # a tie counts half
    same = st.seed_difference([20.0, 20.0], [21.0, 21.0])  # no spread: the difference is exact
    assert (same.diff, same.lo, same.hi, same.p) == (-1.0, -1.0, -1.0, 0.0)
    with pytest.raises(ValueError):
        st.seed_difference([1.0], [2.0, 3.0])


def test_binomial_noise_floor() -> None:
    assert st.binomial_noise_floor(25.0, 50_000) == pytest.approx(math.sqrt(0.25 * 0.75 / 50_000) * 100)
    assert st.binomial_noise_floor(0.0, 10) == 0.0


# ---------------------------------------------------------------- ablation compare

A_SEEDS = {0: (700, 30, 60, 210), 1: (705, 28, 62, 205), 2: (698, 35, 55, 212)}  # per seed: both, only A, only B, neither


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results root: GN and a user's norm at 2 images per GPU (seeds 0-2, per-image results at epochs 1-3, the last
    epoch as A_SEEDS says), GN at 4 images per GPU, BN at 2 without per-image results, an unfinished run, a run on
    another validation set."""
    root = tmp_path_factory.mktemp("cmp")
    runs = root / "runs"
    for seed, counts in A_SEEDS.items():
        a, b = pattern(*counts)
        early = np.arange(1000) % 2 == 0
        ga = write_run(runs, ["norm.name=gn", "batch_per_gpu=2", f"seed={seed}"], curve(24.0))
        write_predictions(ga["folder"], {1: early, 2: early, 3: a})
        mb = write_run(runs, [f"norm.name={MYNORM}", "batch_per_gpu=2", f"seed={seed}"], curve(25.0))
        write_predictions(mb["folder"], {1: early, 2: early, 3: b})
    g4 = write_run(runs, ["norm.name=gn", "batch_per_gpu=4"], curve(24.0))
    write_predictions(g4["folder"], {1: pattern(700, 30, 60, 210)[0]})
    write_run(runs, ["norm.name=bn", "batch_per_gpu=2"], curve(34.0))
    ln = write_run(runs, ["norm.name=ln", "batch_per_gpu=2"], [60.0, 50.0], status=None)
    write_predictions(ln["folder"], {1: early, 2: early})
    other = write_run(runs, ["norm.name=ln", "batch_per_gpu=4"], curve(26.0))
    write_predictions(other["folder"], {1: early, 2: early, 3: early}, fingerprint="ffff000011112222")
    return root


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`ablation ARGV` in this process: (exit code, stdout, stderr)."""
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_one_run_a_side_gives_b_c_mcnemar_and_the_bootstrap(results: Path, cli_env: dict[str, str]) -> None:
    proc = ablation(["compare", "norm=gn batch_per_gpu=2 seed=0", f"norm={MYNORM} batch_per_gpu=2 seed=0", "--results", str(results),
                     "--json"], cli_env)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["epoch"] == 3 and doc["epoch_chosen"] == "the last" and doc["images"] == 1000 and doc["fingerprint"] == FINGERPRINT
    (pair,) = doc["pairs"]
    assert (pair["b"], pair["c"]) == (30, 60) and pair["p"] == pytest.approx(binom_p(30, 60))
    assert (pair["err_a"], pair["err_b"]) == (pytest.approx(27.0), pytest.approx(24.0))
    assert doc["bootstrap"]["diff"] == pytest.approx(3.0) and doc["bootstrap"]["lo"] > 0 and doc["seeds"] is None
    assert doc["a"]["variant"] == "GN (G=32)" and doc["b"]["variant"] == MYNORM and doc["significant"]
    text = ablation(["compare", "norm=gn batch_per_gpu=2 seed=0", f"norm={MYNORM} batch_per_gpu=2 seed=0", "--results", str(results)],
                    cli_env, check=True).stdout.splitlines()
    assert text[0].startswith("A: GN (G=32), 2 images per GPU, seed 0 (norm=gn batch_per_gpu=2 seed=0 under ")
    assert text[2] == f"per-image results of epoch 3 (the last), top-1, on 1,000 validation images (set {FINGERPRINT})"
    assert f"{'0/0':<10} {27.0:8.2f} {24.0:8.2f} {3.0:+7.2f} {30:7d} {60:7d} {compare.p_text(binom_p(30, 60)):>10}" in text[6]
    assert text[-1].startswith(f"A's error is 3.00 points higher than B's (A − B = +3.00, 95 % interval +{doc['bootstrap']['lo']:.2f} to ")
    assert "McNemar p = 0.002" in text[-1] and "B is better at 95 %" in text[-1]


def test_several_seeds_a_side_give_the_seed_level_difference(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["compare", "norm=gn batch_per_gpu=2", f"norm={MYNORM} batch_per_gpu=2", "--results", str(results),
                              "--json", "--draws", "2000"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    errs_a = [100 * (only_b + neither) / 1000 for _, _, only_b, neither in A_SEEDS.values()]
    errs_b = [100 * (only_a + neither) / 1000 for _, only_a, _, neither in A_SEEDS.values()]
    assert doc["a"]["seeds"] == [0, 1, 2] and doc["paired_by"] == "seed"
    assert [(p["b"], p["c"]) for p in doc["pairs"]] == [(oa, ob) for _, oa, ob, _ in A_SEEDS.values()]
    assert doc["a"]["mean"] == pytest.approx(pystats.mean(errs_a)) and doc["a"]["std"] == pytest.approx(pystats.stdev(errs_a))
    assert doc["b"]["n"] == 3 and doc["b"]["mean"] == pytest.approx(pystats.mean(errs_b))
    want = st.seed_difference(errs_a, errs_b)
    assert doc["seeds"]["diff"] == pytest.approx(pystats.mean(errs_a) - pystats.mean(errs_b))
    assert (doc["seeds"]["lo"], doc["seeds"]["hi"], doc["seeds"]["p"]) == (pytest.approx(want.lo), pytest.approx(want.hi),
                                                                             pytest.approx(want.p))
    assert doc["seeds"]["share_a_beats_b"] == 0.0  # every A seed's error is above every B seed's
    assert doc["bootstrap"]["diff"] == pytest.approx(pystats.mean(errs_a) - pystats.mean(errs_b))  # the seed-averaged per-image error
    code, out, _ = run_cli(["compare", "norm=gn batch_per_gpu=2", f"norm={MYNORM} batch_per_gpu=2", "--results", str(results),
                            "--draws", "2000"], capsys)
    assert "  A beats B in 0% of the 9 seed pairs (a tie counts half)" in out.splitlines()
    assert "Welch t-test over seeds" in out.splitlines()[-1]
    assert f"  pooled over the 3 pairs: b = {30 + 28 + 35}, c = {60 + 62 + 55}" in out.splitlines()


def test_options_and_selector_keys_in_any_order(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = "norm=gn batch_per_gpu=2 seed=0", f"norm={MYNORM} batch_per_gpu=2 seed=0"
    base = json.loads(run_cli(["compare", a, b, "--results", str(results), "--json"], capsys)[1])
    for argv in (["compare", "--json", "--results", str(results), a, b],
                 ["compare", a, "--results", str(results), b, "--json", "--epoch", "3"],
                 ["compare", "--epoch", "3", "seed=0 batch_per_gpu=2 norm.name=gn", f"batch_per_gpu=2 norm.name={MYNORM} seed=0",
                  "--json", "--results", str(results)],
                 ["compare", "variant='GN (G=32)' batch_per_gpu=2 seed=0", b, "--json", "--results", str(results)]):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, (argv, err)
        doc = json.loads(out)
        assert (doc["pairs"], doc["bootstrap"], doc["a"]["run_ids"]) == (base["pairs"], base["bootstrap"], base["a"]["run_ids"]), argv


def test_run_folders_and_an_earlier_epoch(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = compare.runs_under([results])
    folder = {(r["norm"], r["batch_per_gpu"], r["seed"]): r["_folder"] for r in runs}
    code, out, err = run_cli(["compare", str(folder[("gn", 2, 0)]), str(folder[("gn", 4, 0)]), "--epoch", "1", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    early, gn4 = np.arange(1000) % 2 == 0, pattern(700, 30, 60, 210)[0]  # the two runs' epoch 1
    assert doc["epoch"] == 1 and doc["epoch_chosen"] == "--epoch"
    assert (doc["pairs"][0]["b"], doc["pairs"][0]["c"]) == (np.sum(early & ~gn4), np.sum(~early & gn4))
    code, out, err = run_cli(["compare", str(folder[("gn", 2, 0)]), str(folder[("gn", 4, 0)])], capsys)
    assert code == 0 and "epoch 1 (the last every run has)" in out.splitlines()[2]


def refusals(results: Path) -> list[tuple[list[str], str]]:
    """(argv, the one line it is refused with), for each refusal."""
    r = str(results)
    runs = compare.runs_under([results])
    bn2 = next(x for x in runs if x["norm"] == "bn")["_folder"]
    ln2 = next(x for x in runs if x["norm"] == "ln" and x["batch_per_gpu"] == 2)
    gn4 = next(x for x in runs if x["norm"] == "gn" and x["batch_per_gpu"] == 4)["_folder"]
    return [
        (["compare", "norm=in batch_per_gpu=2", "norm=gn batch_per_gpu=2", "--results", r],
         f"A: no run under {r} matches 'norm=in batch_per_gpu=2' (norm is one of bn, gn, ln, {MYNORM}; batch_per_gpu is one of 2, 4)"),
        (["compare", "norm=gn", "norm=gn batch_per_gpu=2", "--results", r],
         "A: 'norm=gn' matches runs of 2 settings (GN (G=32), 2 images per GPU; GN (G=32), 4 images per GPU): add keys to pick one "
         "(e.g. batch_per_gpu=, variant=)"),
        (["compare", "norm=gn batch_per_gpu=2", "norm=ln batch_per_gpu=2", "--results", r],
         f"B: 1 of its 1 run(s) did not finish: {ln2['run_id']} (unfinished, 2/10 epochs); compare finished runs (pick seeds with seed=)"),
        (["compare", "norm=gn batch_per_gpu=4", "norm=ln batch_per_gpu=4", "--results", r],
         f"A and B were validated on different sets (fingerprints {FINGERPRINT} (A), ffff000011112222 (B)): their images do not pair"),
        (["compare", "norm=gn batch_per_gpu=2 seed=0", "norm=bn batch_per_gpu=2", "--results", r],
         f"no per-image results (predictions/) in {bn2}: trained before ablation recorded them, so these runs cannot be compared "
         "image by image"),
        (["compare", "norm=gn batch_per_gpu=2 seed=0", "norm=gn batch_per_gpu=4", "--results", r, "--epoch", "3"],
         f"B: epoch 3 has no per-image results in {gn4} (its epochs: 1)"),
        (["compare", "nrom=gn", "norm=gn batch_per_gpu=2", "--results", r],
         f"A: no run under {r} has a field 'nrom' (keys: {', '.join(compare.COLUMNS)}, or a config key such as norm.name or optim.lr)"),
        (["compare", "gn", "norm=gn batch_per_gpu=2", "--results", r],
         "A: 'gn' is neither a run folder nor a selector (key=value words, e.g. 'norm=gn batch_per_gpu=2')"),
        (["compare", "norm=gn batch_per_gpu=2", "norm=gn batch_per_gpu=2", "--results", str(results / "nowhere")],
         f"results folder not found: {results / 'nowhere'} (selectors pick runs under --results)"),
    ]


def test_each_refusal_is_one_line_and_exit_2(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in refusals(results):
        code, out, err = run_cli(argv, capsys)
        assert (code, out, err) == (2, "", f"error: {message}\n"), argv


def test_a_refusal_through_the_command(results: Path, cli_env: dict[str, str]) -> None:
    argv, message = refusals(results)[3]
    proc = ablation(argv, cli_env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", f"error: {message}\n")


# ---------------------------------------------------------------- the significance table


@pytest.fixture(scope="module")
def table_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BN and GN with two seeds at 32 images per GPU (no per-image results); BN, GN and a user's norm with one run each
    and per-image results at 2; LN with one run and none at 32."""
    root = tmp_path_factory.mktemp("sig") / "runs"
    for seed, (bn, gn) in enumerate(((23.6, 24.1), (23.9, 24.4))):
        write_run(root, ["norm.name=bn", "batch_per_gpu=32", f"seed={seed}"], curve(bn))
        write_run(root, ["norm.name=gn", "batch_per_gpu=32", f"seed={seed}"], curve(gn))
    write_run(root, ["norm.name=ln", "batch_per_gpu=32"], curve(25.0))
    kinds = np.repeat(np.arange(4), [600, 40, 10, 350])  # per image: all right; BN wrong only; mine wrong only; all wrong
    for norm, wrong in (("bn", (1, 3)), ("gn", (3,)), (MYNORM, (2, 3))):
        run = write_run(root, [f"norm.name={norm}", "batch_per_gpu=2"], curve(30.0))
        write_predictions(run["folder"], {1: ~np.isin(kinds, (1, 2, 3)), 2: ~np.isin(kinds, wrong)})
    return root.parent


def test_the_significance_table(table_root: Path, tmp_path: Path) -> None:
    rep = report.build([table_root], tmp_path / "report", ["bn", "gn"])
    assert {"table_significance.md", "table_significance.csv"} <= {p.name for p in rep.files}
    df = pd.read_csv(tmp_path / "report" / "table_significance.csv", keep_default_na=False, na_values={c: [""] for c in
                                                                                                        ("diff", "lo", "hi", "p", "epoch")})
    rows = {(r.variant, r.batch_per_gpu, r.baseline): r for r in df.itertuples()}
    assert set(rows) == {("GN (G=32)", 32, "BN"), ("LN", 32, "BN"), ("GN (G=32)", 2, "BN"), (MYNORM, 2, "BN"),
                         ("BN", 32, "GN (G=32)"), ("LN", 32, "GN (G=32)"), ("BN", 2, "GN (G=32)"), (MYNORM, 2, "GN (G=32)")}
    t = rows[("GN (G=32)", 32, "BN")]  # two seeds a side: Welch over the paper metric
    gn, bn = [med(24.1), med(24.4)], [med(23.6), med(23.9)]
    want = st.seed_difference(gn, bn)
    assert t.test == "Welch t-test over seeds" and (t.n, t.n_baseline) == (2, 2)
    assert (t.diff, t.lo, t.hi, t.p) == (pytest.approx(pystats.mean(gn) - pystats.mean(bn)), pytest.approx(want.lo),
                                         pytest.approx(want.hi), pytest.approx(want.p))
    m = rows[("GN (G=32)", 2, "BN")]  # one run a side with per-image results: GN right where BN alone is wrong (40 images)
    assert m.test == "McNemar + paired bootstrap over images" and m.epoch == 2
    assert m.diff == pytest.approx(-4.0) and m.p == pytest.approx(binom_p(40, 0)) and m.lo < -4.0 < m.hi < 0
    mine = rows[(MYNORM, 2, "GN (G=32)")]  # "a user's norm vs GN at 2 images per GPU is one line"
    assert mine.diff == pytest.approx(1.0) and mine.p == pytest.approx(binom_p(0, 10)) and mine.lo > 0
    mine_bn = rows[(MYNORM, 2, "BN")]  # mine wrong on 10, BN on 40: b = 40, c = 10
    assert mine_bn.diff == pytest.approx(-3.0) and mine_bn.p == pytest.approx(binom_p(40, 10))
    ln = rows[("LN", 32, "BN")]
    assert ln.test == "—" and ln.note == "one seed on a side and no per-image results: no test" and math.isnan(ln.diff)
    md = (tmp_path / "report" / "table_significance.md").read_text().splitlines()
    assert md[2] == "| norm | images per GPU | vs | difference | 95 % interval | p | seeds | test |"
    assert (f"| {MYNORM} | 2 | GN (G=32) | +1.00 | {mine.lo:+.2f} to {mine.hi:+.2f} | {compare.p_text(binom_p(0, 10))} | 1 vs 1 | "
            "McNemar + paired bootstrap over images, epoch 2 |") in md
    assert "| LN | 32 | BN | — | — | — | 1 vs 2 | one seed on a side and no per-image results: no test |" in md
