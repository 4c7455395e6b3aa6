"""The run config: one frozen dataclass whose defaults are Wu & He's ImageNet recipe.

Torch-free on purpose: sweeps, the launcher and the aggregator read configs without importing torch.

Every field carries metadata:
- ``help``: one line shown in docs and errors;
- ``hash``: False for fields that do not change results (paths, workers, logging); they are left out
  of the run id, so e.g. moving ImageNet to another folder keeps the same run folder.
A field added after run folders exist must not change the old run ids: give it
``omit_if_default=True`` so it enters the hash only when set to a non-default value.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import types
import typing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ablation.errors import ConfigError, ConfigWarning
from ablation.norms import registry
from ablation.norms.registry import RUNNING_STATS_RULES

# Bump only with a deliberate break of every run id (announced in CHANGELOG.md).
HASH_VERSION = 1

IMAGENET_TRAIN_IMAGES = 1_281_167
SCHEDULES = ("step", "cosine")
PIPELINES = ("reference", "split", "device-decode")
TRACKERS = ("off", "tensorboard", "wandb")  # the extras named after them hold their packages
# Keys the trainer writes into config.yaml beside the config; reading one back ignores them.
WRITTEN_KEYS = ("run_id", "config_hash", "derived")


def _f(default: Any, help: str, *, hash: bool = True, omit_if_default: bool = False) -> Any:
    """A dataclass field with its help line and hash behaviour."""
    meta = {"help": help, "hash": hash, "omit_if_default": omit_if_default}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in a frozen config")
    return field(default=default, metadata=meta)


class FrozenMapping(Mapping[str, Any]):
    """A read-only dict for the frozen configs that, unlike types.MappingProxyType, pickles and deep-copies."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True)
class NormConfig:
    """Which normalization layer goes in every norm position of the network (names: ablation.norms.registry)."""

    name: str = _f(
        "bn", "a registry name (`ablation norms` lists them: bn, syncbn, gn, ln, in, ...) or a user factory 'package.module:function'"
    )
    groups: int | None = _f(
        None, "gn, evonorm_s0: number of groups G in every layer (32 when neither groups nor channels_per_group is set)"
    )
    channels_per_group: int | None = _f(None, "gn: channels per group instead of a fixed G (so G varies by layer)")
    # None resolves to the norm's paper default (registry.NormInfo.eps) in normalized(), so every run
    # made when this was a plain 1e-5 keeps its id.
    eps: float | None = _f(None, "epsilon of the norm (null = the norm's paper default: 1e-5 for most)")
    momentum: float = _f(0.1, "BN running-average momentum (PyTorch convention; Caffe2's 0.9 = 0.1 here)")
    running_stats: str = _f(
        "rank0",
        "BN running statistics across GPUs: rank0 (GPU 0's, as PyTorch DDP and Caffe2 broadcast) | mean (averaged over GPUs)",
    )
    precise_bn_images: int = _f(
        0,
        "PreciseBN: before each evaluation, recompute population statistics over this many training images (0 = off)",
        omit_if_default=True,
    )
    # brn only (registry params); null = the registry's default, the GN paper's BR setting (r_max 1.5, d_max 0.5, no warm-up).
    r_max: float | None = _f(None, "brn: r = clip(sigma_B/sigma, 1/r_max, r_max) (null = 1.5)", omit_if_default=True)
    d_max: float | None = _f(None, "brn: d = clip((mu_B - mu)/sigma, -d_max, d_max) (null = 0.5)", omit_if_default=True)
    renorm_warmup_steps: int | None = _f(
        None,
        "brn: ramp the limits linearly from plain BN (r_max 1, d_max 0) over this many training steps (null = 0, none)",
        omit_if_default=True,
    )
    options: Mapping[str, Any] = field(
        default_factory=FrozenMapping,
        metadata={"help": "extra keyword options for the norm factory (user norms)", "hash": True},
    )
    # The normalization batch (Wu & Johnson 2021): null keeps every run made before it existed at its id.
    batch: int | None = _f(
        None,
        "normalization batch: BN-like norms take statistics over groups of this many consecutive images of each GPU's "
        "batch; must divide batch_per_gpu (null = batch_per_gpu); docs/norms.md states the grouping rule",
        omit_if_default=True,
    )


@dataclass(frozen=True)
class ModelConfig:
    """The network: a timm ResNet with the chosen norm in every position."""

    name: str = _f("resnet50", "timm ResNet name: resnet50 (v1.5, the paper's), resnet101, resnet18, resnet10t, ...")
    widths: tuple[int, ...] | None = _f(None, "stage widths overriding timm's (64, 128, 256, 512), for small test/demo models")
    stem_width: int | None = _f(None, "stem output channels overriding timm's")
    stem: str = _f("default", "default (timm's ImageNet stem) | small (one 3x3 conv, no max-pool, for tiny images)")
    stem_stride: int = _f(1, "small stem: stride of its 3x3 conv", omit_if_default=True)
    layers: tuple[int, ...] | None = _f(None, "residual blocks per stage overriding timm's, e.g. [1, 1, 1, 1]", omit_if_default=True)
    zero_init_last: bool = _f(True, "zero-init gamma of each residual block's last norm (paper, after Goyal et al.)")
    fc_init_std: float = _f(0.01, "std of the normal init of the final fully-connected layer")
    # Weight Standardization (ablation/norms/weight_std.py): the official code's definition, unbiased std + 1e-5.
    weight_std: bool = _f(
        False,
        "Weight Standardization of every conv (stem, blocks, downsample; not the FC), with any norm (GN+WS: Qiao et al.)",
        omit_if_default=True,
    )


@dataclass(frozen=True)
class DataConfig:
    """The dataset (ImageFolder layout) and the paper's augmentation, scalable to small images."""

    root: str = _f("data/imagenet", "folder with train/<class>/*.JPEG and val/<class>/*.JPEG", hash=False)
    image_size: int = _f(224, "train crop and eval centre-crop size")
    eval_resize: int | None = _f(None, "eval: resize shorter side to this before the centre crop (None = image_size*256/224)")
    crop_scale: tuple[float, float] = _f((0.08, 1.0), "random-resized-crop area range")
    crop_ratio: tuple[float, float] = _f((3 / 4, 4 / 3), "random-resized-crop aspect-ratio range")
    color_jitter: float = _f(0.4, "brightness, contrast and saturation jitter")
    lighting: float = _f(0.1, "AlexNet-style PCA lighting noise std")
    hflip: bool = _f(True, "random horizontal flip")
    mean: tuple[float, float, float] = _f((0.485, 0.456, 0.406), "normalization mean")
    std: tuple[float, float, float] = _f((0.229, 0.224, 0.225), "normalization std")
    # The split pipeline changes pixels (by resampling, where it decodes JPEGs at reduced scale), so it
    # is in the run id. `reference` stays the default and is left out of the hash, so every run folder
    # made before this field existed keeps its id and resumes with the pixels it started with; the
    # fast path is opt-in (docs/data.md).
    pipeline: str = _f(
        "reference",
        "reference (whole augmentation per image on the loader, in float) | split (loader decodes, crops, resizes to uint8; "
        "jitter, lighting, normalize, flip batched on the device) "
        "| device-decode (loader only reads files and draws parameters; "
        "JPEG decode (nvJPEG on GPUs), crop, resize and the rest on the device)",
        omit_if_default=True,
    )
    workers: int = _f(8, "data-loading worker processes per training process", hash=False)
    cache_gb: float = _f(
        0.0,
        "decoded images kept in the training process's memory, up to this many GB: a small dataset is read and decoded "
        "once per start instead of once per epoch (with data.workers=0, whose loading runs in that process; pixels unchanged)",
        hash=False,
    )
    eval_batch: int = _f(100, "images per evaluation batch per process (no effect on results)", hash=False)


@dataclass(frozen=True)
class OptimConfig:
    """SGD with the linear scaling rule and a step schedule, as in the paper."""

    lr: float = _f(0.1, "learning rate at the reference global batch; scaled linearly with the global batch")
    reference_batch: int = _f(256, "global batch at which lr applies: 0.1 x global/256 = 0.1 x N/32 on 8 GPUs")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum (fb.resnet.torch, which the paper follows)")
    weight_decay: float = _f(1e-4, "L2 weight decay")
    no_decay_1d: bool = _f(False, "timm-style: no decay on 1-D parameters (norm gamma/beta, biases); the paper decays them")
    schedule: str = _f("step", "step (divide by 10 at milestones) | cosine")
    milestones: tuple[float, ...] = _f((0.3, 0.6, 0.9), "step schedule: LR drops at these fractions of training (30/60/90 of 100 epochs)")
    gamma: float = _f(0.1, "step schedule: factor at each milestone")
    warmup_epochs: float = _f(0.0, "linear warm-up epochs (the paper uses none)")


EVAL_MODES = ("ema", "precise", "batch")


@dataclass(frozen=True)
class EvalConfig:
    """How each epoch's validation is evaluated: the EMA's population statistics always, other ways opt-in (docs/norms.md)."""

    modes: tuple[str, ...] = _f(
        ("ema",),
        "evaluations per epoch: ema (population statistics from the running averages: val_err1, always) | precise "
        "(PreciseBN statistics beside the EMA, which stays untouched) | batch (validation in batches of norm.batch images "
        "normalized by their own statistics); each extra mode costs about one more validation pass",
        omit_if_default=True,
    )
    precise_images: int = _f(
        0, "eval.modes precise: training images PreciseBN averages over (needs > 0 with precise)", omit_if_default=True
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run; the defaults are the paper's ResNet-50 BN run."""

    gpus: int = _f(8, "GPUs the experiment models (8 in the paper); fewer processes may stand in for them")
    batch_per_gpu: int = _f(32, "images per GPU (the paper's 'batch size'); BN statistics are per GPU")
    epochs: int = _f(100, "training epochs, the same for every batch size")
    seed: int = _f(0, "seed for init and data order")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "network", "hash": True})
    norm: NormConfig = field(default_factory=NormConfig, metadata={"help": "normalization", "hash": True})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data and augmentation", "hash": True})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule", "hash": True})
    # In the run id only when set (omit_if_default: all-default sections leave the hash), so every older run keeps its id;
    # in it at all because a folder's metrics.jsonl must hold the same evaluations at every start.
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "evaluation modes per epoch", "hash": True, "omit_if_default": True}
    )
    amp: bool = _f(False, "bfloat16 autocast on GPU (ignored on CPU)")
    # In the run id (TF32 rounds float32 convolutions and matmuls to a 10-bit mantissa), but only when set:
    # null is what every run made before this field did.
    tf32: bool | None = _f(
        None,
        "TF32 tensor cores for float32 convolutions and matmuls on GPU: true | false | null "
        "(torch's defaults: convolutions TF32, matmuls not)",
        omit_if_default=True,
    )
    channels_last: bool = _f(False, "channels-last memory format on GPU (ignored on CPU)", hash=False)
    device: str = _f("auto", "auto | cpu | cuda", hash=False)
    # Not in the run id: compiled and eager runs agree to float tolerance, as runs on other thread counts do.
    compile: str = _f(
        "off", "torch.compile the model: off | inductor | another torch.compile backend (e.g. aot_eager to debug)", hash=False
    )
    metric_epochs: int = _f(5, "the paper's metric: median val error of the last this-many epochs", hash=False)
    checkpoint_every_steps: int = _f(0, "also checkpoint every this-many steps (0 = only at epoch ends and on signals)", hash=False)
    checkpoint_every_minutes: float = _f(10.0, "also checkpoint after this many minutes since the last one (0 = off)", hash=False)
    log_every_steps: int = _f(50, "progress and divergence check every this-many steps", hash=False)
    log_steps: bool = _f(False, "write steps.jsonl with every step's loss and LR", hash=False)
    # Not in the run id: turning live curves on or off, even between two starts of one run, changes no number.
    tracking: str = _f(
        "off",
        "live curves of each epoch's metrics from rank 0: off | tensorboard (event files in <run>/tb/) "
        "| wandb (offline unless WANDB_MODE says otherwise); docs/tracking.md",
        hash=False,
    )


SECTIONS: dict[str, type] = {"model": ModelConfig, "norm": NormConfig, "data": DataConfig, "optim": OptimConfig, "eval": EvalConfig}


# ---------------------------------------------------------------- loading and type checking


def _type_name(tp: Any) -> str:
    """A short human name for a type annotation."""
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check value against annotation tp (converting YAML/CLI forms), or raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-4' as a string
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: a text field takes the word back
            return "on" if value else "off"
    elif origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], key) for v in value)
            if len(value) == len(args):
                return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    elif origin in (collections.abc.Mapping, dict):
        if isinstance(value, Mapping):
            untyped = [n for n in value if not isinstance(n, str)] if args and args[0] is str else []
            if untyped:
                boolean = isinstance(untyped[0], bool)
                hint = " (YAML reads an unquoted on/off/yes/no/true/false as a boolean: quote the name)" if boolean else ""
                raise ConfigError(f"{key}: names must be text, got {untyped[0]!r}{hint}")
            return FrozenMapping(value)
    else:  # pragma: no cover - a new annotation kind needs a branch above
        raise TypeError(f"unsupported annotation {tp} for {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(keys: list[tuple[str, list[str]]], what: str = "config key") -> ConfigError:
    """The error for unknown keys, (dotted name, the valid names beside it): each with a suggestion, then the valid keys."""
    named = []
    for key, valid in keys:
        section, _, leaf = key.rpartition(".")
        close = difflib.get_close_matches(leaf, valid, n=1)
        hint = f" (did you mean '{section + '.' if section else ''}{close[0]}'?)" if close else ""  # the full dotted name to type
        named.append(f"'{key}'{hint}")
    levels = {key.rpartition(".")[0]: valid for key, valid in keys}
    valid = "; ".join(f"{section}.{{{', '.join(names)}}}" if section else ", ".join(names) for section, names in levels.items())
    return ConfigError(f"unknown {what}{'s' if len(keys) > 1 else ''} {', '.join(named)}; valid: {valid}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """typing.get_type_hints(cls), once per class (read only)."""
    # A report validates a few dozen configs of 17 dataclasses each: resolving the annotations every time was a third of it.
    return typing.get_type_hints(cls)


def _unknown_keys(cls: type, data: Any, prefix: str) -> list[tuple[str, list[str]]]:
    """The keys in data (and its sections) that cls does not have: (dotted name, the valid names beside it)."""
    if not isinstance(data, Mapping):
        return []
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = []
    for key, value in data.items():
        if key not in names:
            out.append((prefix + str(key), names))
        elif dataclasses.is_dataclass(hints[key]):
            out += _unknown_keys(hints[key], value, f"{prefix}{key}.")
    return out


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str, what: str = "config key") -> Any:
    """Build dataclass cls from a mapping, strictly (unknown keys, all named at once, and wrong types are errors)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or what.split()[0]}: expected a mapping of keys, got {data!r}")
    hints = _hints(cls)
    unknown = _unknown_keys(cls, data, prefix)
    if unknown:  # every misspelt key at once, not one per try
        raise _unknown_key(unknown, what)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value or {}, f"{prefix}{key}.", what)
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain (YAML/JSON-ready) nested dict of a config dataclass."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, Mapping):
            v = dict(v)
        out[f.name] = v
    return out


def from_dict(data: Mapping[str, Any]) -> RunConfig:
    """A validated RunConfig from a nested mapping (a missing key takes the paper's default)."""
    data = {k: v for k, v in data.items() if k not in WRITTEN_KEYS}
    cfg = build_dataclass(RunConfig, data, "")
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Nested dict from dotted 'key=value' strings (values parsed as YAML scalars or lists)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. batch_per_gpu=4 or norm.name=gn)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys from a nested mapping ({'norm': {'name': 'gn'}} -> {'norm.name': 'gn'}); `options` stays a leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "options":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, over winning."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and k != "options":
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return data


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The run config from an optional YAML file plus dotted key=value overrides."""
    data = load_yaml(path) if path else {}
    try:
        return from_dict(merge(data, parse_overrides(overrides or [])))
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def replace(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A validated copy with dotted-key changes, e.g. replace(cfg, **{'norm.name': 'gn'})."""
    return from_dict(merge(to_dict(cfg), parse_overrides([f"{k}={json.dumps(v)}" for k, v in changes.items()])))


# ---------------------------------------------------------------- validation and resolution


def _positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    """Raise ConfigError unless value > 0 (or >= 0)."""
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig) -> None:
    """Raise ConfigError for impossible values; checks that need the model's widths live in models.py."""
    _positive(cfg.gpus, "gpus")
    _positive(cfg.batch_per_gpu, "batch_per_gpu")
    _positive(cfg.epochs, "epochs")
    _positive(cfg.metric_epochs, "metric_epochs")
    for key in ("checkpoint_every_steps", "checkpoint_every_minutes"):
        _positive(getattr(cfg, key), key, allow_zero=True)
    _positive(cfg.log_every_steps, "log_every_steps")
    if cfg.tracking not in TRACKERS:
        raise ConfigError(f"tracking must be one of {', '.join(TRACKERS)}; got {cfg.tracking!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be one of auto, cpu, cuda; got {cfg.device!r}")
    n = cfg.norm
    registry.lookup(n.name)  # an unknown name: one line with the valid ones
    if n.running_stats not in RUNNING_STATS_RULES:
        raise ConfigError(f"norm.running_stats must be one of {', '.join(RUNNING_STATS_RULES)}; got {n.running_stats!r}")
    # norm.batch is checked below (a warning, not an error, for batch-independent norms)
    optional = [f.name for f in dataclasses.fields(NormConfig) if f.default in (None, 0) and f.default is not False and f.name != "batch"]
    registry.check_fields(n, [key for key in optional if getattr(n, key) not in (None, 0)])
    if n.groups is not None:
        _positive(n.groups, "norm.groups")
    if n.channels_per_group is not None:
        _positive(n.channels_per_group, "norm.channels_per_group")
    if n.eps is not None:
        _positive(n.eps, "norm.eps")
    _positive(n.precise_bn_images, "norm.precise_bn_images", allow_zero=True)
    if n.r_max is not None and not (math.isfinite(n.r_max) and n.r_max >= 1):
        raise ConfigError(f"norm.r_max must be >= 1 (1 = no rescaling), got {n.r_max}")
    if n.d_max is not None:
        _positive(n.d_max, "norm.d_max", allow_zero=True)
    if n.renorm_warmup_steps is not None:
        _positive(n.renorm_warmup_steps, "norm.renorm_warmup_steps", allow_zero=True)
    if not 0 <= n.momentum <= 1:
        raise ConfigError(f"norm.momentum must be in [0, 1], got {n.momentum}")
    _validate_norm_batch(cfg)
    _validate_eval(cfg)
    m = cfg.model
    if m.stem not in ("default", "small"):
        raise ConfigError(f"model.stem must be one of default, small; got {m.stem!r}")
    if m.widths is not None and (len(m.widths) != 4 or min(m.widths) < 1):
        raise ConfigError(f"model.widths must be 4 positive stage widths, got {m.widths}")
    if m.layers is not None and (len(m.layers) != 4 or min(m.layers) < 1):
        raise ConfigError(f"model.layers must be 4 positive block counts, got {m.layers}")
    if m.stem_stride not in (1, 2):
        raise ConfigError(f"model.stem_stride must be 1 or 2, got {m.stem_stride}")
    if m.stem_width is not None:
        _positive(m.stem_width, "model.stem_width")
    _positive(m.fc_init_std, "model.fc_init_std")
    d = cfg.data
    _positive(d.image_size, "data.image_size")
    if d.eval_resize is not None and d.eval_resize < d.image_size:
        raise ConfigError(f"data.eval_resize ({d.eval_resize}) must be >= data.image_size ({d.image_size})")
    if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {d.crop_scale}")
    if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        raise ConfigError(f"data.crop_ratio must satisfy 0 < low <= high, got {d.crop_ratio}")
    _positive(d.color_jitter, "data.color_jitter", allow_zero=True)
    _positive(d.lighting, "data.lighting", allow_zero=True)
    if min(d.std) <= 0:
        raise ConfigError(f"data.std must be positive, got {d.std}")
    if d.pipeline not in PIPELINES:
        raise ConfigError(f"data.pipeline must be one of {', '.join(PIPELINES)}; got {d.pipeline!r}")
    _positive(d.workers, "data.workers", allow_zero=True)
    _positive(d.cache_gb, "data.cache_gb", allow_zero=True)
    _positive(d.eval_batch, "data.eval_batch")
    o = cfg.optim
    _positive(o.lr, "optim.lr")
    _positive(o.reference_batch, "optim.reference_batch")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        raise ConfigError("optim.nesterov needs optim.momentum > 0")
    _positive(o.weight_decay, "optim.weight_decay", allow_zero=True)
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule must be one of {', '.join(SCHEDULES)}; got {o.schedule!r}")
    if any(not 0 < x < 1 for x in o.milestones) or list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones must be increasing fractions of training in (0, 1), got {o.milestones}")
    _positive(o.gamma, "optim.gamma")
    _positive(o.warmup_epochs, "optim.warmup_epochs", allow_zero=True)
    if o.warmup_epochs >= cfg.epochs:
        raise ConfigError(f"optim.warmup_epochs ({o.warmup_epochs}) must be shorter than epochs ({cfg.epochs})")


def _validate_norm_batch(cfg: RunConfig) -> None:
    """norm.batch divides batch_per_gpu and applies to a norm with per-GPU batch statistics (a warning where it is meaningless)."""
    nb = cfg.norm.batch
    if nb is None:
        return
    _positive(nb, "norm.batch")
    if cfg.batch_per_gpu % nb:
        raise ConfigError(
            f"norm.batch={nb} must divide batch_per_gpu={cfg.batch_per_gpu} (each GPU's batch is split into normalization "
            f"batches of norm.batch images); use a divisor such as {', '.join(str(d) for d in _divisors(cfg.batch_per_gpu))}"
        )
    info = registry.lookup(cfg.norm.name)
    if info is None or nb == cfg.batch_per_gpu:
        return
    if info.batch_dependent and not info.per_gpu_stats:
        raise ConfigError(f"norm.batch applies to norms with per-GPU batch statistics (bn, brn, evonorm_b0), not '{info.name}', "
                          "whose statistics span the global batch; remove norm.batch or use norm.name=bn")
    if not info.batch_dependent:
        warnings.warn(f"norm.batch={nb} has no effect on '{info.name}': it normalizes each image on its own", ConfigWarning, stacklevel=3)


def _divisors(n: int) -> list[int]:
    """The divisors of n, smallest first."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _validate_eval(cfg: RunConfig) -> None:
    """eval.modes: known, unique, with ema; precise needs its image count and does not mix with norm.precise_bn_images."""
    e = cfg.eval
    unknown = [m for m in e.modes if m not in EVAL_MODES]
    if unknown:
        raise ConfigError(f"eval.modes: unknown mode {unknown[0]!r}; valid: {', '.join(EVAL_MODES)}")
    if len(set(e.modes)) != len(e.modes) or "ema" not in e.modes:
        raise ConfigError(f"eval.modes must list each mode once and include ema (val_err1, the paper's metric); got {list(e.modes)}")
    _positive(e.precise_images, "eval.precise_images", allow_zero=True)
    if "precise" in e.modes and not e.precise_images:
        raise ConfigError("eval.modes has precise but eval.precise_images is 0: set how many training images PreciseBN averages over")
    if e.precise_images and "precise" not in e.modes:
        raise ConfigError("eval.precise_images is set but eval.modes has no precise: add precise to eval.modes or remove it")
    if "precise" in e.modes and cfg.norm.precise_bn_images:
        raise ConfigError("norm.precise_bn_images replaces the EMA before every evaluation, so eval.modes precise would compare "
                          "PreciseBN with itself: set one of them (eval.modes=[ema,precise] keeps the EMA and adds PreciseBN)")


def norm_batch(cfg: RunConfig) -> int:
    """The normalization batch: norm.batch, or batch_per_gpu where it is not set."""
    return cfg.norm.batch or cfg.batch_per_gpu


def norm_batches_per_gpu(cfg: RunConfig) -> int:
    """Normalization batches in each GPU's batch (1 unless norm.batch is set below batch_per_gpu)."""
    return cfg.batch_per_gpu // norm_batch(cfg)


# ---------------------------------------------------------------- derived values and the run id


@dataclass(frozen=True)
class Derived:
    """Values computed from the config (and the dataset size): the one place they are computed."""

    global_batch: int
    lr: float
    eval_resize: int
    train_images: int
    steps_per_epoch: int
    total_steps: int
    milestone_steps: tuple[int, ...]
    warmup_steps: int


def derive(cfg: RunConfig, train_images: int = IMAGENET_TRAIN_IMAGES) -> Derived:
    """Global batch, scaled LR, steps per epoch and schedule steps for a dataset of train_images."""
    global_batch = cfg.gpus * cfg.batch_per_gpu
    steps_per_epoch = train_images // global_batch  # the last incomplete global batch is dropped
    if steps_per_epoch < 1:
        raise ConfigError(
            f"data: {train_images} training images cannot fill one global batch of {global_batch} "
            f"(gpus={cfg.gpus} x batch_per_gpu={cfg.batch_per_gpu}); use more images or a smaller batch"
        )
    total = steps_per_epoch * cfg.epochs
    return Derived(
        global_batch=global_batch,
        lr=cfg.optim.lr * global_batch / cfg.optim.reference_batch,
        eval_resize=cfg.data.eval_resize or round(cfg.data.image_size * 256 / 224),
        train_images=train_images,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        milestone_steps=tuple(round(f * total) for f in cfg.optim.milestones),
        warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch),
    )


def hash_view(obj: Any) -> dict[str, Any]:
    """The result-affecting fields of a config, as a nested dict."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if not f.metadata.get("hash", True):
            continue
        v = getattr(obj, f.name)
        if f.metadata.get("omit_if_default") and v == (type(v)() if dataclasses.is_dataclass(v) else f.default):
            continue
        out[f.name] = hash_view(v) if dataclasses.is_dataclass(v) else v
    return out


def canonical(v: Any) -> Any:
    """Values in a JSON form that does not depend on Python types (tuple vs list, 1 vs 1.0)."""
    if isinstance(v, Mapping):
        return {str(k): canonical(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [canonical(x) for x in v]
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def config_hash(cfg: RunConfig) -> str:
    """A stable 10-hex-digit hash of the fields that change results."""
    view = canonical({"hash_version": HASH_VERSION, **hash_view(normalized(cfg))})
    blob = json.dumps(view, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def normalized(cfg: RunConfig) -> RunConfig:
    """The config with equivalent spellings made equal, so they share a run id.

    Unset norm fields take the norm's paper defaults (the registry's: eps, brn's r_max ...). gn without
    G means G=32; gn with G=1 is the paper's LN and gn with one channel per group its IN (the same
    layers exactly), so Table 3's G=1 and C/G=1 rows reuse Table 1's LN and IN runs.
    """
    n = cfg.norm
    if n.name == "gn":
        if n.groups == 1:
            n = dataclasses.replace(n, name="ln", groups=None)
        elif n.channels_per_group == 1:
            n = dataclasses.replace(n, name="in", channels_per_group=None)
        elif n.groups is None and n.channels_per_group is None:
            n = dataclasses.replace(n, groups=32)
    filled = registry.resolved_defaults(n)
    if filled:
        n = dataclasses.replace(n, **filled)
    if n.batch == cfg.batch_per_gpu:  # the default spelled out: the same run as leaving it unset
        n = dataclasses.replace(n, batch=None)
    return cfg if n == cfg.norm else dataclasses.replace(cfg, norm=n)


def norm_label(norm: NormConfig) -> str:
    """A short readable name of the norm and its parameters: bn, gn32, gn-cpg16, ln, mypkg.norms-mynorm."""
    if norm.name == "gn":
        if norm.channels_per_group is not None:
            return f"gn-cpg{norm.channels_per_group}"
        return f"gn{norm.groups or 32}"
    if ":" in norm.name:
        module, _, fn = norm.name.partition(":")
        return f"{module.rsplit('.', 1)[-1]}-{fn}"
    return norm.name


def run_id(cfg: RunConfig) -> str:
    """The run folder's name: readable axes plus the hash of every result-affecting field."""
    cfg = normalized(cfg)
    nb = f"n{cfg.norm.batch}" if cfg.norm.batch else ""  # the normalization batch, where it is not the GPU's batch
    return f"{cfg.model.name}_{norm_label(cfg.norm)}_b{cfg.batch_per_gpu}x{cfg.gpus}{nb}_s{cfg.seed}_{config_hash(cfg)}"


def field_help(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every leaf field, for docs and `ablation config --help`."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows += field_help(tp, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, f.metadata.get("help", ""), dict(default) if isinstance(default, Mapping) else default))
    return rows
