"""The paper's recipe as data (paper_recipe.yaml), and how a run differs from it. Torch-free.

A run is in the paper's setting where none of its result-affecting fields differs from the recipe (the axes the
paper sweeps aside: the norm and its options, images per GPU, the seed, ResNet-50 or -101) and its data are
ImageNet-1k by the counts the trainer records (classes, train and val images). Everywhere else, `summary` says how
it differs, grouped and short ("10 epochs, not 100; 1 GPU, not 8; cosine schedule, not step").
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import yaml

RECIPE_FILE = Path(__file__).resolve().parent / "paper_recipe.yaml"
# Fields whose differences are named together in one item of a summary.
AUGMENTATION = ("data.crop_scale", "data.crop_ratio", "data.color_jitter", "data.lighting", "data.hflip", "data.mean", "data.std")
MODEL_SHAPE = ("model.widths", "model.stem_width", "model.stem", "model.stem_stride", "model.layers")


@functools.lru_cache(maxsize=1)
def recipe_text() -> str:
    """paper_recipe.yaml's text (part of what a report's outputs are made from)."""
    return RECIPE_FILE.read_text()


@functools.lru_cache(maxsize=1)
def paper_recipe() -> dict[str, Any]:
    """The recipe: name, swept (field names, `x.*` a section), models, dataset (counts, tolerance), fields (dotted: value)."""
    return yaml.safe_load(recipe_text())


def swept(key: str) -> bool:
    """True for a field the paper itself varies (its value never makes a run unlike the paper's)."""
    for pattern in paper_recipe()["swept"]:
        if key == pattern or (pattern.endswith(".*") and key.startswith(pattern[:-1])):
            return True
    return False


def _value(v: Any) -> Any:
    """A field's value as compared: result_fields' JSON text of a list or dict read back."""
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def _equal(a: Any, b: Any) -> bool:
    """Equal values, numbers to float precision (1e-4 and 0.0001, 1 and 1.0), booleans only to booleans."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _eval_resize(v: Any, size: Any) -> Any:
    """The evaluation resize a run's data.eval_resize means (null: image_size x 256 / 224, the paper's 256 at 224)."""
    if v is None and isinstance(size, (int, float)) and not isinstance(size, bool):
        return round(size * 256 / 224)
    return v


def deviations(fields: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, the run's value, the paper's) for each result-affecting field (collect.result_fields) that differs from the
    recipe, the swept axes aside, in the recipe's order (a field it does not hold last, by name; its paper value None).
    A field the run's config leaves out is at its default, the recipe's. data.eval_resize compares as the resize it
    means beside the paper's 256/224 of the run's own image size (the image size is a difference of its own)."""
    recipe = paper_recipe()
    paper = recipe["fields"]
    out = []
    for key in [*paper, *sorted(k for k in fields if k not in paper)]:
        if swept(key) or key not in fields:
            continue
        mine, theirs = _value(fields[key]), paper.get(key)
        if key == "model.name":
            if mine not in recipe["models"]:
                out.append((key, mine, theirs))
            continue
        if key == "data.eval_resize":
            size = fields.get("data.image_size", paper["data.image_size"])
            mine, theirs = _eval_resize(mine, size), _eval_resize(theirs, size)
            if not _equal(mine, theirs):
                out.append((key, mine, theirs))  # the paper's at this image size: 256/224 of it
            continue
        if key not in paper or not _equal(mine, theirs):
            out.append((key, mine, theirs))
    return out


def deviations_text(devs: list[tuple[str, Any, Any]]) -> str:
    """runs.csv's `deviations`: 'epochs=10; gpus=1; optim.schedule=cosine' ('' for none)."""
    return "; ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else v}" for k, v, _ in devs)


def dataset_differences(derived: Any) -> list[str]:
    """How a run's data differ from ImageNet-1k by the counts config.yaml's `derived` records (num_classes, train_images,
    val_images), as one item ('5,120 train images, not ImageNet-1k's 1,281,167'; '10 classes, 5,120 train and 1,000 val
    images, not ImageNet-1k'); a count not recorded (an older run folder) leaves the data not known to be ImageNet-1k; a
    prepared subset (derived.dataset_subset) is never ImageNet-1k, whatever its counts."""
    want = paper_recipe()["dataset"]
    derived = derived if isinstance(derived, dict) else {}
    if derived.get("dataset_subset"):  # dataset.json of `ablation data prepare --classes/--per-class`: whatever the counts
        return [f"a subset of ImageNet-1k, not ImageNet-1k: {derived['dataset_subset']}"]
    off, unknown = {}, []
    for key, count in (("num_classes", "class"), ("train_images", "train-image"), ("val_images", "val-image")):
        n = derived.get(key)
        if not isinstance(n, int) or isinstance(n, bool):
            unknown.append(count)
        elif abs(n - want[key]) > (0 if key == "num_classes" else want["tolerance"] * want[key]):
            off[key] = n
    if len(off) == 1:
        (key, n), = off.items()
        what = {"num_classes": "classes", "train_images": "train images", "val_images": "val images"}[key]
        return [f"{n:,} {what}, not ImageNet-1k's {want[key]:,}"]
    if off:  # a count that is not ImageNet-1k's settles it; the unrecorded ones add nothing
        images = [f"{off[k]:,} {w}" for k, w in (("train_images", "train"), ("val_images", "val")) if k in off]
        parts = ([f"{off['num_classes']:,} classes"] if "num_classes" in off else []) + [" and ".join(images) + " images"] * bool(images)
        return [f"{', '.join(parts)}, not ImageNet-1k"]
    if unknown:
        counts = " and ".join([", ".join(unknown[:-1]), unknown[-1]] if len(unknown) > 1 else unknown)
        return [f"data not known to be ImageNet-1k ({counts} count{'s' if len(unknown) > 1 else ''} not recorded)"]
    return []


def _num(v: Any) -> str:
    """A number as written in a caption (1e-05, 0.2, 8)."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def _list(v: Any) -> str:
    """A list as written in a caption: [0.08, 1]."""
    return "[" + ", ".join(map(_num, v)) + "]" if isinstance(v, (list, tuple)) else _num(v)


def _plural(n: Any, one: str, many: str) -> str:
    return f"{_num(n)} {one if n == 1 else many}"


def _augmentation(key: str, v: Any) -> str:
    """One augmentation field's difference, short."""
    name = {"data.crop_scale": "crop scale", "data.crop_ratio": "crop ratio", "data.color_jitter": "colour jitter",
            "data.lighting": "PCA lighting", "data.mean": "mean", "data.std": "std"}.get(key)
    if key == "data.hflip":
        return "flip" if v else "no flip"
    if key in ("data.color_jitter", "data.lighting") and isinstance(v, (int, float)) and v == 0:
        return f"no {name}"
    return f"{name or key} {_list(v)}"


def _text(key: str, v: Any, p: Any) -> str:
    """One field's difference, short: '10 epochs, not 100'."""
    texts = {
        "epochs": lambda: f"{_plural(v, 'epoch', 'epochs')}, not {p}",
        "gpus": lambda: f"{_plural(v, 'GPU', 'GPUs')}, not {p}",
        "amp": lambda: "AMP (bfloat16)" if v else "no AMP",
        "tf32": lambda: f"TF32 {'on' if v else 'off'}, not torch's defaults",
        "data.pipeline": lambda: f"{v} data pipeline, not {p}",
        "data.image_size": lambda: f"{v}-px images, not {p}",
        "data.eval_resize": lambda: f"evaluation resize {v}, not {p} (256/224 of the crop)",
        "optim.lr": lambda: f"LR {_num(v)} at the reference batch, not {_num(p)}",
        "optim.reference_batch": lambda: f"LR reference batch {v}, not {p}",
        "optim.momentum": lambda: f"momentum {_num(v)}, not {_num(p)}",
        "optim.nesterov": lambda: "Nesterov momentum" if v else "no Nesterov momentum",
        "optim.weight_decay": lambda: f"weight decay {_num(v)}, not {_num(p)}",
        "optim.no_decay_1d": lambda: "no decay on γ, β and biases" if v else "decay on 1-D parameters",
        "optim.schedule": lambda: f"{v} schedule, not {p}",
        "optim.milestones": lambda: f"LR steps at {_list(v)} of training, not {_list(p)}",
        "optim.gamma": lambda: f"LR step factor {_num(v)}, not {_num(p)}",
        "optim.warmup_epochs": lambda: f"{_plural(v, 'warm-up epoch', 'warm-up epochs')}, not none",
        "model.zero_init_last": lambda: "no zero γ in each block's last norm" if not v else "zero γ in each block's last norm",
        "model.fc_init_std": lambda: f"FC init std {_num(v)}, not {_num(p)}",
    }
    if key in texts:
        return texts[key]()
    value = json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else _num(v)
    if p is None and key not in paper_recipe()["fields"]:
        return f"{key}={value}"
    return f"{key}={value}, not {json.dumps(p) if isinstance(p, (list, dict, bool)) or p is None else _num(p)}"


def summary(devs: list[tuple[str, Any, Any]], model: str | None = None) -> list[str]:
    """The differences, grouped and short, one item each: the model (with its own shape; `model`: the run's model name,
    where it is the paper's), then each field in the recipe's order, the augmentation fields as one item
    ('own augmentation: crop scale [1, 1], no colour jitter')."""
    by_key = {k: v for k, v, _ in devs}
    out = []
    shape = [k.split(".", 1)[1] for k in MODEL_SHAPE if k in by_key]
    name = by_key.get("model.name")
    if name is not None:
        own = f" (own {', '.join(shape)})" if shape else ""
        out.append(f"model {name}{own}, not ResNet-50/101")
    elif shape:
        out.append(f"{model or paper_recipe()['fields']['model.name']} with its own {', '.join(shape)}")
    augmentation = [_augmentation(k, by_key[k]) for k in AUGMENTATION if k in by_key]
    for key, v, p in devs:
        if key == "model.name" or key in MODEL_SHAPE:
            continue
        if key in AUGMENTATION:
            if augmentation:
                out.append("own augmentation: " + ", ".join(augmentation))
                augmentation = []
            continue
        out.append(_text(key, v, p))
    return out
