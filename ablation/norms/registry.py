"""The norm registry: the one list of built-in norm names and what each one is. Torch-free.

Config validation, the sweep generator, the launcher and the aggregator ask this module (without
importing torch) which names exist, which ``norm.*`` fields apply to each, what a name's paper
default ε is and whether it depends on the batch. The layers themselves are built by the factory
an entry names (``module:function``, imported on first use by ``ablation.norms.factory``).

A user's own norm needs no entry: ``norm.name=package.module:factory`` is resolved by import path.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ablation.errors import ConfigError

# norm.* fields every norm accepts; the rest (NormInfo.params) apply only where an entry lists them.
COMMON_FIELDS = ("name", "eps", "options")
RUNNING_STATS_RULES = ("rank0", "mean")
DEFAULT_EPS = 1e-5


@dataclass(frozen=True)
class NormInfo:
    """One registry entry: a built-in norm's name, factory, and the facts other modules ask about."""

    name: str
    factory: str  # "module:function", called as function(num_channels, NormSpec) -> nn.Module
    summary: str
    label: str  # the name tables print (the literature's spelling)
    batch_dependent: bool  # training-mode output of an image depends on its batch mates
    running_stats: bool = False  # keeps population statistics for evaluation (PreciseBN applies)
    per_gpu_stats: bool = False  # batch statistics per modelled GPU: the stand-in must keep them apart
    replaces_activation: bool = False  # a norm+activation layer (FRN+TLU, EvoNorm): see models.py
    params: tuple[str, ...] = ()  # norm.* fields beyond COMMON_FIELDS that apply to this norm
    eps: float = DEFAULT_EPS  # the paper's ε, used when norm.eps is not set
    defaults: tuple[tuple[str, Any], ...] = field(default=())  # paper defaults of params left unset
    aliases: tuple[str, ...] = ()  # other spellings in the literature's tables (reference files), e.g. BR for BRN


_ENTRIES: dict[str, NormInfo] = {}


def register(info: NormInfo) -> NormInfo:
    """Add (or replace) an entry; returns it."""
    _ENTRIES[info.name] = info
    return info


def names() -> tuple[str, ...]:
    """Every registered norm name, in registration order."""
    return tuple(_ENTRIES)


def entries() -> tuple[NormInfo, ...]:
    """Every registry entry, in registration order."""
    return tuple(_ENTRIES.values())


def is_import_path(name: str) -> bool:
    """True for a user factory spelled 'package.module:function'."""
    return ":" in name


def lookup(name: str) -> NormInfo | None:
    """The entry for a registry name; None for a user's import path; ConfigError for an unknown name."""
    if name in _ENTRIES:
        return _ENTRIES[name]
    if is_import_path(name):
        return None
    close = difflib.get_close_matches(name, list(_ENTRIES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"norm.name: unknown norm '{name}'{hint}; valid: {', '.join(_ENTRIES)} or 'package.module:factory'")


def label(name: str) -> str:
    """The literature's name of a norm (BN, GN, BRN ...); a user's import path as given."""
    info = _ENTRIES.get(name)
    return info.label if info else name


def spellings(name: str) -> set[str]:
    """Every spelling of a norm in the literature's tables, upper case: its name, label and aliases."""
    info = _ENTRIES.get(name)
    return {name.upper(), *((info.label.upper(), *(a.upper() for a in info.aliases)) if info else ())}


# ---------------------------------------------------------------- group arithmetic (gn, ln, in, evonorm_s0)


def resolved_groups(norm: Any, channels: int) -> int:
    """Number of groups a group-style norm uses in a layer with this many channels."""
    if norm.name == "ln":
        return 1
    if norm.name == "in":
        return channels
    if norm.channels_per_group is not None:
        return channels // norm.channels_per_group
    return norm.groups if norm.groups is not None else 32


def check_channels(norm: Any, channels: int, where: str = "") -> None:
    """Raise ConfigError if gn (or evonorm_s0, same rule) cannot divide a layer of this many channels into groups."""
    at = f" ({where})" if where else ""
    if norm.name not in ("gn", "evonorm_s0"):
        return
    if norm.channels_per_group is not None:
        if channels % norm.channels_per_group:
            raise ConfigError(
                f"norm.channels_per_group={norm.channels_per_group} does not divide a layer's {channels} channels{at}; "
                "use a divisor of every layer width (e.g. 1, 2, 4, 8, 16)"
            )
        return
    g = resolved_groups(norm, channels)
    if channels % g:
        raise ConfigError(
            f"norm.groups={g} does not divide a layer's {channels} channels{at}; "
            "use a divisor of every layer width (e.g. 1, 2, 4, 8, 16, 32)"
        )


# ---------------------------------------------------------------- validation and defaults


def check_fields(norm: Any, set_fields: Iterable[str]) -> None:
    """Raise ConfigError when a norm.* field is set that the chosen norm does not take (user norms take all)."""
    info = lookup(norm.name)
    if info is None:
        return
    for key in set_fields:
        if key in COMMON_FIELDS or key in info.params:
            continue
        takers = [i.name for i in _ENTRIES.values() if key in i.params]
        raise ConfigError(f"norm.{key} applies to {', '.join(takers) or 'no built-in norm'}, not '{norm.name}'")
    if norm.name == "gn" and norm.groups is not None and norm.channels_per_group is not None:
        raise ConfigError("norm: set either norm.groups or norm.channels_per_group for gn, not both")


def resolved_defaults(norm: Any) -> dict[str, Any]:
    """The unset (None) norm.* fields this norm fills with its paper defaults: {'eps': 1e-5, ...}."""
    info = lookup(norm.name)
    out: dict[str, Any] = {}
    if norm.eps is None:
        out["eps"] = info.eps if info else DEFAULT_EPS
    for key, value in info.defaults if info else ():
        if getattr(norm, key) is None:
            out[key] = value
    return out


# ---------------------------------------------------------------- built-in entries

_BN_PARAMS = ("momentum", "running_stats", "precise_bn_images")

register(NormInfo(
    "bn", "ablation.norms.batch:make_bn", "BatchNorm, statistics per modelled GPU (never synced), as in the paper",
    "BN", batch_dependent=True, running_stats=True, per_gpu_stats=True, params=_BN_PARAMS,
))
register(NormInfo(
    "syncbn", "ablation.norms.batch:make_syncbn", "BatchNorm, statistics over the global batch (all GPUs)",
    "SyncBN", batch_dependent=True, running_stats=True, params=("momentum", "precise_bn_images"),
))
register(NormInfo(
    "gn", "ablation.norms.group:make_group_norm", "GroupNorm (Wu & He): G groups of channels per image",
    "GN", batch_dependent=False, params=("groups", "channels_per_group"),
))
register(NormInfo("ln", "ablation.norms.group:make_group_norm", "LayerNorm over (C, H, W): GN with G=1", "LN", batch_dependent=False))
register(NormInfo("in", "ablation.norms.group:make_group_norm", "InstanceNorm: GN with one channel per group", "IN", batch_dependent=False))
register(NormInfo("none", "ablation.norms.group:make_identity", "no normalization", "none", batch_dependent=False))
register(NormInfo(
    "frn", "ablation.norms.response:make_frn",
    "Filter Response Normalization + TLU (Singh & Krishnan): x/sqrt(mean_HW(x^2)+eps), affine, max(y, tau); per image",
    "FRN", batch_dependent=False, replaces_activation=True, eps=1e-6,
))
register(NormInfo(
    "evonorm_s0", "ablation.norms.evonorm:make_evonorm_s0",
    "EvoNorm-S0 (Liu et al.): x*sigmoid(v*x)/group_std(x), affine; G groups as gn; per image",
    "EvoNorm-S0", batch_dependent=False, replaces_activation=True, params=("groups",), defaults=(("groups", 32),),
    aliases=("EvoNormS0",),
))
register(NormInfo(
    "brn", "ablation.norms.renorm:make_brn",
    "Batch Renormalization (Ioffe): per-GPU batch statistics corrected by r, d towards moving mean and std",
    "BRN", batch_dependent=True, running_stats=True, per_gpu_stats=True,
    params=(*_BN_PARAMS, "r_max", "d_max", "renorm_warmup_steps"),
    defaults=(("r_max", 1.5), ("d_max", 0.5), ("renorm_warmup_steps", 0)),  # the GN paper's BR setting, no warm-up
    aliases=("BR", "BReNorm"),  # the GN paper's §4.1 calls it BR
))
register(NormInfo(
    "evonorm_b0", "ablation.norms.evonorm_b0:make_evonorm_b0",
    "EvoNorm-B0 (Liu et al.): x/max(sqrt(var_NHW+eps), v*x+sqrt(var_HW+eps)), affine; batch variance per GPU",
    "EvoNorm-B0", batch_dependent=True, running_stats=True, per_gpu_stats=True, replaces_activation=True, params=_BN_PARAMS,
    aliases=("EvoNormB0",),
))
