"""`ablation probe`: how much each norm makes an image's output depend on its batch, per images per GPU.

Seconds on a CPU, no training and no dataset: a small ResNet (freshly initialized, the same weights for
every norm and batch size) and generated images (``ablation.data.synth``'s shapes with the demo's per-image
brightness and contrast, rendered in memory). For each norm and each per-GPU batch size ``b`` (a probe
batch is one modelled GPU's ``b`` images, ``gpus_per_process=1``; ``--gpus K`` makes it K GPUs' worth,
``K x b`` images in one process as a stand-in run has them) it measures two figures on the network's
penultimate features (global-average-pooled, before the classifier), both after the warm-up below:

batch_dependence
    In training mode, take a probe image and put it in ``draws`` batches whose other ``b - 1`` images
    are drawn afresh from a pool; its features ``y_1 .. y_T`` then differ only by its batch mates. The
    figure is the mean pairwise distance over the mean norm, ``mean_{s<t} |y_s - y_t| / mean_t |y_t|``,
    averaged over ``probes`` probe images. 0 (to float precision) for a norm that never looks across
    images (GN, LN, IN); large for BN at 2 images per GPU. Measured with warmed running statistics,
    which matters for norms whose training forward reads them (BRN).
train_eval_gap
    ``|y_train - y_eval| / |y_eval|`` per image for the same batch in training and in evaluation mode,
    averaged over every image of those batches, once the running statistics have been brought to the
    data: ``warmup`` training-mode forward passes (no gradient, weights unchanged) over random batches of
    the same ``b`` images, with the norm's own momentum, as training would leave them. The probe
    batches themselves do not move the running statistics (buffers are restored after each training-
    mode forward). 0 for a norm that computes the same thing in both modes. Norms whose training-mode
    forward moves no buffer (``updates_buffers`` False: GN, a user's RMS norm) need no warm-up.

Which model: the probe's own defaults (``PROBE_DEFAULTS``: a narrow ResNet-18, one block per stage,
widths 32-256 so the paper's G=32 divides every layer, a small stem on 32 px images, no zero-init of
the blocks' last norms so every norm position is on the path) with the config file and ``key=value``
overrides on top; a config or override that names ``model.name`` replaces the probe's model defaults
as a block. Which norms: ``norm.name`` (registry name or ``package.module:factory``) when the config or
an override gives one, else ``--norms`` (default: every registry norm but ``none``). ``norm.*`` fields
go to the norms that take them (``norm.groups=16`` reaches GN and leaves BN alone). ``batch_per_gpu``
and ``gpus`` of the config are not used: ``--batches`` gives the batch sizes. It runs on the CPU.

Deterministic given ``seed``: the weights, the images and every draw of batch mates are the same for
every norm (so differences are the norms'), and a rerun gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ablation import config
from ablation.data.synth import SynthSpec, render_image, validate_spec
from ablation.errors import AblationError, ConfigError, NormError
from ablation.norms import registry

if TYPE_CHECKING:
    import pandas as pd
    import torch

DEFAULT_BATCHES = (32, 16, 8, 4, 2)
# The probe's model and images, under the config file and overrides.
PROBE_MODEL = {
    "name": "resnet18", "layers": [1, 1, 1, 1], "widths": [32, 64, 128, 256], "stem_width": 32,
    "stem": "small", "stem_stride": 2, "zero_init_last": False,
}
PROBE_DEFAULTS: dict[str, Any] = {"model": PROBE_MODEL, "data": {"image_size": 32}, "device": "cpu"}
# The demo's images (ablation/demo.py): shape = class; colours, position, size, brightness and contrast
# vary per image, so images differ in their overall statistics as photographs do.
IMAGES = SynthSpec(classes=10, min_colour_distance=0.5, position=0.25, scale=(0.45, 0.75), rotation=0.0,
                   noise=0.05, brightness=0.3, contrast=0.3)
MIN_POOL = 128  # generated images the batches are drawn from (at least 4x the largest batch)
NUM_CLASSES = 10  # the classifier is removed; this only sizes the head create_model builds
CSV_NAME, FIGURE_NAME = "probe.csv", "probe.png"
COLUMNS = (
    "norm", "label", "weight_std", "batch_per_gpu", "gpus", "batch_dependence", "train_eval_gap", "updates_buffers",
    "batch_dependent", "running_stats", "per_gpu_stats", "replaces_activation",
)
REGISTRY_FACTS = ("batch_dependent", "running_stats", "per_gpu_stats", "replaces_activation")


@dataclass(frozen=True)
class Settings:
    """How much to measure: batch sizes, draws of batch mates per probe image, probe images, warm-up passes."""

    batches: tuple[int, ...] = DEFAULT_BATCHES
    draws: int = 4
    probes: int = 4
    warmup: int = 40
    gpus: int = 1  # modelled GPUs one probe batch stands for: gpus x b images in one process
    threads: int = 1  # torch threads while measuring: the forwards are small, where threads cost more than they give

    def __post_init__(self) -> None:
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batches: expected positive images per GPU, e.g. 32,16,8,4,2; got {list(self.batches)}")
        if self.draws < 2:
            raise ConfigError(f"--draws must be at least 2 (batch dependence compares draws), got {self.draws}")
        if self.probes < 1:
            raise ConfigError(f"--probes must be at least 1, got {self.probes}")
        if self.warmup < 1:
            raise ConfigError(f"--warmup must be at least 1, got {self.warmup}")
        if self.gpus < 1:
            raise ConfigError(f"--gpus must be at least 1, got {self.gpus}")
        if self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")


def parse_list(text: str, what: str) -> list[str]:
    """Comma-separated items, stripped, none empty."""
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise ConfigError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


def parse_batches(text: str) -> tuple[int, ...]:
    """'32,16,8' -> (32, 16, 8), largest first, each once."""
    try:
        values = [int(s) for s in parse_list(text, "--batches")]
    except ValueError:
        raise ConfigError(f"--batches: expected integers, e.g. 32,16,8,4,2; got {text!r}") from None
    return tuple(sorted(set(values), reverse=True))


# ---------------------------------------------------------------- which configs


def default_norms() -> list[str]:
    """Every registry norm but `none` (a network without normalization says nothing about batches)."""
    return [n for n in registry.names() if n != "none"]


def _takes(name: str, key: str) -> bool:
    """Whether norm `name` takes norm.<key>: a field another built-in norm owns is left out for it."""
    info = registry.lookup(name)
    if info is None or key in registry.COMMON_FIELDS or key in info.params:
        return True
    return not any(key in i.params for i in registry.entries())


def configs(path: str | None, overrides: Sequence[str], norms: Sequence[str] | None) -> list[config.RunConfig]:
    """One validated RunConfig per norm to probe; ConfigError/NormError (one line) before anything runs."""
    data = config.load_yaml(path) if path else {}
    try:
        given = config.merge(data, config.parse_overrides(list(overrides)))
        user_model = isinstance(given.get("model"), dict) and "name" in given["model"]
        base = {k: v for k, v in PROBE_DEFAULTS.items() if not (k == "model" and user_model)}
        raw = config.merge(base, given)
        norm = raw.pop("norm", None) or {}
        if not isinstance(norm, dict):
            raise ConfigError(f"norm: expected a mapping of keys, got {norm!r}")
        norm = dict(norm)
        if "name" in norm and norms:
            raise ConfigError(f"give the norms to probe either as norm.name=... or as --norms, not both (norm.name={norm['name']})")
        names = [str(norm.pop("name"))] if "name" in norm else list(norms or default_norms())
        if not names:
            raise ConfigError("no norms to probe: the registry holds none but `none`; give --norms or norm.name=...")
        for key in norm:  # a field no probed norm takes is the registry's usual one-line error
            if not any(_takes(n, key) for n in names):
                registry.check_fields(config.NormConfig(name=names[0]), [key])
        out = []
        for name in dict.fromkeys(names):
            section = {k: v for k, v in norm.items() if _takes(name, k)}
            out.append(config.from_dict({**raw, "norm": {**section, "name": name}}))
        return out
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def check_models(cfgs: Sequence[config.RunConfig]) -> None:
    """Build every norm on the model (meta device): a G not dividing C or a broken factory fails now."""
    from ablation.train.models import check_model_norm

    for cfg in cfgs:
        check_model_norm(cfg, NUM_CLASSES)


def check_out(out: Path) -> None:
    """Make the output folder and check a file can be created in it, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-check.", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None


# ---------------------------------------------------------------- measuring


def images(cfg: config.RunConfig, count: int) -> torch.Tensor:
    """`count` generated images at the config's image size, normalized with its mean and std (N, 3, S, S)."""
    import torch

    spec = dataclasses.replace(IMAGES, size=cfg.data.image_size, seed=cfg.seed)
    try:
        validate_spec(spec)
    except AblationError as e:
        raise ConfigError(f"data.image_size={cfg.data.image_size}: the probe's generated images cannot be drawn ({e})") from None
    pixels = np.stack([render_image(spec, 0, i % spec.classes, i // spec.classes) for i in range(count)])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


@dataclass(frozen=True)
class Draws:
    """Which pool images make up every batch at one batch size (the same for every norm)."""

    warmup: list[np.ndarray]  # `warmup` batches of n = gpus x b random images
    trials: list[list[np.ndarray]]  # per probe image, `draws` batches: the probe image first (GPU 0's), then n-1 others


def draws(seed: int, b: int, pool: int, s: Settings) -> Draws:
    """The batches at b images per GPU, from a generator seeded by (seed, b, gpus)."""
    rng = np.random.default_rng([seed, b, s.gpus])
    n = s.gpus * b
    warm = [rng.choice(pool, n, replace=False) for _ in range(s.warmup)]
    probes = rng.choice(pool, s.probes, replace=False)
    trials = []
    for p in probes:
        others = np.delete(np.arange(pool), p)
        trials.append([np.concatenate([[p], rng.choice(others, n - 1, replace=False)]) for _ in range(s.draws)])
    return Draws(warm, trials)


def _model(cfg: config.RunConfig, gpus: int) -> torch.nn.Module:
    """The probe's network for one norm: seeded init, classifier removed (outputs = pooled features)."""
    import torch

    from ablation.train.models import create_model

    torch.manual_seed(cfg.seed)
    model = create_model(cfg, NUM_CLASSES, gpus_per_process=gpus)
    model.reset_classifier(0)
    return model


def measure(cfg: config.RunConfig, x: torch.Tensor, d: Draws, gpus: int = 1) -> dict[str, Any]:
    """Batch dependence, train/eval gap and whether training mode moves buffers, for one norm on the batches `d`."""
    import torch

    model = _model(cfg, gpus).train()
    buffers = list(model.buffers())
    before = [t.clone() for t in buffers]
    model(x[d.warmup[0]])
    updates = any(not torch.equal(a, t) for a, t in zip(before, buffers))
    if updates:  # running statistics: bring them to the data, as training at this batch size would
        for idx in d.warmup[1:]:
            model(x[idx])
    warmed = [t.clone() for t in buffers]
    dependence, gaps = [], []
    for batches in d.trials:
        mine = []
        for idx in batches:
            batch = x[idx]
            train = model.train()(batch).double()
            for t, w in zip(buffers, warmed):  # the probe batches leave the running statistics as warmed
                t.copy_(w)
            evaluated = model.eval()(batch).double()
            mine.append(train[0])
            gaps.append(((train - evaluated).norm(dim=1) / evaluated.norm(dim=1).clamp_min(1e-30)).mean().item())
        y = torch.stack(mine)
        dependence.append((torch.pdist(y).mean() / y.norm(dim=1).mean().clamp_min(1e-30)).item())
    return {"batch_dependence": float(np.mean(dependence)), "train_eval_gap": float(np.mean(gaps)), "updates_buffers": updates}


def _facts(name: str) -> dict[str, Any]:
    """The registry's facts of a norm (empty for a user's import path)."""
    info = registry.lookup(name)
    return {k: (getattr(info, k) if info else None) for k in REGISTRY_FACTS}


def run(cfgs: Sequence[config.RunConfig], s: Settings) -> pd.DataFrame:
    """One row per norm x batch size (COLUMNS), largest batch first."""
    import pandas as pd
    import torch

    pool = max(MIN_POOL, 4 * s.gpus * max(s.batches))
    x = images(cfgs[0], pool)  # the probe changes only norm.*: one set of images for every norm
    plans = {b: draws(cfgs[0].seed, b, pool, s) for b in s.batches}
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    try:
        rows = _rows(cfgs, s, x, plans)
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _rows(cfgs: Sequence[config.RunConfig], s: Settings, x: torch.Tensor, plans: dict[int, Draws]) -> list[dict[str, Any]]:
    """Measure every norm at every batch size (no gradients)."""
    import torch

    rows = []
    with torch.no_grad():
        for cfg in cfgs:
            name = cfg.norm.name
            for b in s.batches:
                try:
                    got = measure(cfg, x, plans[b], s.gpus)
                except AblationError:
                    raise
                except Exception as e:  # noqa: BLE001 - a norm that cannot run at this batch size (or a user norm's bug): one line
                    raise NormError(f"norm '{name}' at batch_per_gpu={b}: {type(e).__name__}: {e}") from None
                ws = bool(cfg.model.weight_std)  # the convolutions change with it: the label says so, as the report's do
                label = registry.label(name) + ("+WS" if ws else "")
                rows.append({"norm": name, "label": label, "weight_std": ws, "batch_per_gpu": b, "gpus": s.gpus, **got, **_facts(name)})
    return rows


# ---------------------------------------------------------------- output


def _batch_kind(name: str) -> str:
    """The registry's batch column (as `ablation norms` prints it); '?' for a user norm."""
    info = registry.lookup(name)
    if info is None:
        return "?"
    return "per-GPU" if info.per_gpu_stats else ("global" if info.batch_dependent else "no")


def format_table(df: pd.DataFrame) -> str:
    """Both figures as norms x batch sizes (largest batch first), with the registry's batch dependence."""
    parts = []
    titles = {
        "batch_dependence": "batch dependence (train mode): relative change of an image's features when its batch mates are redrawn",
        "train_eval_gap": ("train/eval gap: relative distance of train- and eval-mode features of the same batch "
                           "(running statistics warmed)"),
    }
    order = list(dict.fromkeys(df["norm"]))
    for column, title in titles.items():
        wide = df.pivot(index="norm", columns="batch_per_gpu", values=column).loc[order]
        wide = wide[sorted(wide.columns, reverse=True)]
        wide.columns = [f"b={c}" for c in wide.columns]
        wide.insert(0, "registry", [_batch_kind(n) for n in order])
        if df["weight_std"].any():  # every probed norm shares the model, so all rows or none
            wide.index = [f"{n}+WS" for n in wide.index]
        wide.index.name = "norm"
        parts.append(title + "\n" + wide.to_string(float_format=lambda v: f"{v:.3g}"))
    return "\n\n".join(parts)


def figure(df: pd.DataFrame, path: Path) -> None:
    """Both figures against images per GPU (log2 axis, largest left as in the paper), one line per norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    batches = sorted(df["batch_per_gpu"].unique(), reverse=True)
    markers = "os^vDPX*<>"  # lines that coincide (BN and SyncBN on one GPU, every batch-free norm at 0) stay tellable
    for i, (name, grp) in enumerate(df.groupby("norm", sort=False)):
        grp = grp.sort_values("batch_per_gpu")
        info = registry.lookup(name)
        style = "-" if info is None or info.batch_dependent else "--"
        for ax, column in zip(axes, ("batch_dependence", "train_eval_gap")):
            ax.plot(grp["batch_per_gpu"], grp[column], style, marker=markers[i % len(markers)], ms=5, mfc="none",
                    label=grp["label"].iloc[0])
    for ax, title in zip(axes, ("batch dependence (train mode)", "train/eval gap")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(int(b)) for b in batches])
        ax.minorticks_off()
        ax.invert_xaxis()
        ax.set_xlabel("images per GPU (log scale)")
        ax.set_ylabel("relative L2 change of features")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write(df: pd.DataFrame, out: Path) -> list[Path]:
    """probe.csv and probe.png in `out`: both written to temporary files first, then each renamed into place
    (a failure before the renames leaves the folder as it was: no half-written or mismatched pair)."""
    from ablation.rundir import atomic_path

    csv, png = out / CSV_NAME, out / FIGURE_NAME
    with atomic_path(csv) as tmp_csv, atomic_path(png) as tmp_png:
        df.to_csv(tmp_csv, index=False)
        figure(df, tmp_png)
    return [csv, png]


def main(path: str | None, overrides: Sequence[str], out: str | Path, norms: str | None, s: Settings) -> list[Path]:
    """The `ablation probe` command: check everything, measure, write the files, print the table."""
    t0 = time.monotonic()
    cfgs = configs(path, overrides, parse_list(norms, "--norms") if norms is not None else None)
    check_models(cfgs)
    out = Path(out)
    check_out(out)
    df = run(cfgs, s)
    files = write(df, out)
    print(format_table(df))
    seconds = time.monotonic() - t0
    stand_in = f", {s.gpus} modelled GPUs per batch" if s.gpus > 1 else ""
    print(f"wrote {files[0]} and {files[1]} ({len(cfgs)} norms x {len(s.batches)} batch sizes{stand_in} in {seconds:.1f} s)")
    return files


__all__ = ["DEFAULT_BATCHES", "PROBE_DEFAULTS", "Settings", "configs", "format_table", "main", "measure", "run", "write"]
