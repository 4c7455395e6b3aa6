"""The statistics behind `ablation compare` and the report's significance table. Torch-free: numpy and scipy.

Errors are in percent and differences in points, always A's minus B's: a negative difference is A making fewer
mistakes. Per-image tests take each side's correctness of every validation image (booleans, or for several seeds
the share of them that got the image right), in the same image order on both sides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # every interval here is a 95 % one


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """(b, c, p): b the images only A gets right, c those only B gets right, p the exact two-sided McNemar p-value
    (a binomial test of min(b, c) out of b + c at one half; 1 where the two sides disagree on no image)."""
    a, b_ = _booleans(a_correct, b_correct)
    b = int(np.count_nonzero(a & ~b_))
    c = int(np.count_nonzero(~a & b_))
    from scipy import stats  # here, not at the top: a second of import that a report without tests never needs

    p = 1.0 if b + c == 0 else float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)
    return b, c, min(1.0, p)


def paired_bootstrap(a_correct: np.ndarray, b_correct: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): A's error minus B's in points, and its 95 % percentile interval from `draws` resamplings
    of the images with replacement (the same images for both sides: the pairs are kept), from a fixed seed.

    Correctness may be a share (several seeds averaged per image). A resampling of n images with replacement takes each
    distinct per-image difference a multinomial number of times: drawn so, it costs one draw of a handful of counts, not
    of n indices, and is the same distribution."""
    a, b = _shares(a_correct, b_correct)
    n = len(a)
    if n == 0:
        raise ValueError("no images to compare")
    d = (b - a) * 100.0  # per image: A's error minus B's (1 - a) - (1 - b), in points
    values, counts = np.unique(d, return_counts=True)
    rng = np.random.default_rng(seed)
    picked = rng.multinomial(n, counts / n, size=draws)  # draws x distinct values: how often each is drawn
    means = picked @ values / n
    lo, hi = np.percentile(means, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return float(d.mean()), float(lo), float(hi)


@dataclass(frozen=True)
class SeedSummary:
    """A side's per-seed errors: their mean, standard deviation (n - 1; NaN for one seed) and count."""

    mean: float
    std: float
    n: int

    def text(self) -> str:
        """'24.10 ± 0.12 (n=3)', or '24.10 (n=1)'."""
        if self.n > 1:
            return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n})"
        return f"{self.mean:.2f} (n={self.n})"


def seed_summary(values: list[float] | np.ndarray) -> SeedSummary:
    """Mean, standard deviation (ddof=1) and number of per-seed values."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("no values")
    return SeedSummary(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size))


@dataclass(frozen=True)
class SeedDifference:
    """A's mean minus B's, its Welch t interval (95 %), the t-test's two-sided p-value and degrees of freedom."""

    diff: float
    lo: float
    hi: float
    p: float
    df: float


def seed_difference(a_values: list[float] | np.ndarray, b_values: list[float] | np.ndarray) -> SeedDifference:
    """The seed-level difference of means (A − B) with Welch's t interval and p-value (scipy's ttest_ind, unequal
    variances); two or more values a side. Where neither side varies, the difference is exact: its interval is the
    point, and p is 0 (a difference) or 1 (none)."""
    a, b = np.asarray(a_values, dtype=float), np.asarray(b_values, dtype=float)
    if a.size < 2 or b.size < 2:
        raise ValueError("a t interval needs two or more seeds a side")
    diff = float(a.mean() - b.mean())
    if a.std() == 0 and b.std() == 0:
        return SeedDifference(diff, diff, diff, 0.0 if diff else 1.0, math.nan)
    from scipy import stats

    res = stats.ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(LEVEL)
    return SeedDifference(diff, float(ci.low), float(ci.high), float(res.pvalue), float(res.df))


def share_a_beats_b(a_values: list[float] | np.ndarray, b_values: list[float] | np.ndarray) -> float:
    """The share of (A seed, B seed) pairs, all of them, in which A's error is lower than B's; a tie counts half."""
    a, b = np.asarray(a_values, dtype=float)[:, None], np.asarray(b_values, dtype=float)[None, :]
    return float(((a < b) + 0.5 * (a == b)).mean())


def binomial_noise_floor(error_pct: float, n_images: int) -> float:
    """The standard error, in points, of an error rate measured on n images: sqrt(p (1 - p) / n), p the error as a share."""
    p = error_pct / 100.0
    return math.sqrt(p * (1 - p) / n_images) * 100.0


def _booleans(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per-image results of different shapes: {a.shape} and {b.shape}")
    return a, b


def _shares(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"per-image results of different shapes: {a.shape} and {b.shape}")
    return a, b
