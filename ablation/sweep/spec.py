"""Sweep specs: a base config plus axes, expanded into run configs. Torch-free.

A spec (YAML)::

    name: fig1_batch_size            # the sweep's folder under the results root
    base: {epochs: 100}              # run-config keys (nested or dotted); the rest are the paper's defaults
    grid:                            # Cartesian product
      norm.name: [bn, gn]
      batch_per_gpu: [32, 16, 8, 4, 2]
    zip:                             # values that move together (equal lengths), crossed with the grid;
      batch_per_gpu: [32, 2]         # a list of such mappings gives several zipped groups
      optim.lr: [0.1, 0.00625]
    conditions:                      # axes that apply only where `when` matches the run's config
      - when: {norm.name: gn}
        grid: {norm.groups: [32, 16]}
    blocks:                          # a union: each block expands like the top level (grid, zip,
      - grid: {norm.groups: [64, 32]}   # conditions) and the runs are pooled; with blocks, the
      - grid: {norm.channels_per_group: [64, 32]}   # top-level axes apply to every block
    exclude:                         # drop runs whose config matches every key of an entry
      - {norm.name: bn, batch_per_gpu: 2}
    seeds: [0, 1, 2]                 # or an int n for seeds 0..n-1

Runs that come out identical (same run id) are kept once; two sweeps sharing a config share the run
folder, so nothing is trained twice.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ablation import config
from ablation.config import ConfigError, RunConfig

SPEC_KEYS = ("name", "description", "base", "grid", "zip", "conditions", "blocks", "exclude", "seeds")
BLOCK_KEYS = ("grid", "zip", "conditions")
CONDITION_KEYS = ("when", "grid", "zip")


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its config, id and the values of the sweep's axes."""

    run_id: str
    config: RunConfig
    axes: Mapping[str, Any]


@dataclass(frozen=True)
class Sweep:
    """An expanded sweep."""

    name: str
    description: str
    runs: tuple[PlannedRun, ...]
    axes: tuple[str, ...]
    spec: Mapping[str, Any]


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested mapping from dotted keys."""
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def _check_keys(where: str, d: Any, valid: tuple[str, ...]) -> None:
    """Raise ConfigError for a non-mapping or unknown keys at `where`."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {d!r}")
    for k in d:
        if k not in valid:
            close = difflib.get_close_matches(str(k), valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{k}'{hint}; valid: {', '.join(valid)}")


def _axis_values(where: str, axes: Any) -> dict[str, list[Any]]:
    """A mapping of axis -> non-empty list of values."""
    if not isinstance(axes, Mapping):
        raise ConfigError(f"{where}: expected a mapping of axis: [values], got {axes!r}")
    out = {}
    for k, v in config.flatten(axes).items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{where}.{k}: expected a non-empty list of values, got {v!r}")
        out[k] = v
    return out


def _grid(where: str, axes: Any) -> list[dict[str, Any]]:
    """Cartesian product of the axes."""
    vals = _axis_values(where, axes)
    return [dict(zip(vals, combo)) for combo in itertools.product(*vals.values())]


def _zip(where: str, groups: Any) -> list[dict[str, Any]]:
    """Zipped axes: each group's lists move together; several groups are crossed."""
    groups = groups if isinstance(groups, list) else [groups]
    combos: list[dict[str, Any]] = [{}]
    for i, g in enumerate(groups):
        vals = _axis_values(f"{where}[{i}]" if len(groups) > 1 else where, g)
        lengths = {k: len(v) for k, v in vals.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"{where}: zipped axes need equal lengths, got {lengths}")
        rows = [dict(zip(vals, combo)) for combo in zip(*vals.values())]
        combos = [{**a, **b} for a in combos for b in rows]
    return combos


def _cross(a: list[dict[str, Any]], b: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """All pairs of two lists of axis assignments; an axis set twice is an error."""
    out = []
    for x in a:
        for y in b:
            both = set(x) & set(y)
            if both:
                raise ConfigError(f"{where}: axis {sorted(both)[0]} is set twice (in the grid and a zip or condition)")
            out.append({**x, **y})
    return out


def _lookup(flat_base: Mapping[str, Any], combo: Mapping[str, Any], key: str) -> Any:
    """A dotted key's value for a run: its axis value, else the base's, else the default."""
    if key in combo:
        return combo[key]
    if key in flat_base:
        return flat_base[key]
    node: Any = config.RunConfig()
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def _matches(flat_base: Mapping[str, Any], combo: Mapping[str, Any], when: Mapping[str, Any]) -> bool:
    """True when the run's values equal every key of `when` (a list value means any of them)."""
    for k, v in config.flatten(when).items():
        got = _lookup(flat_base, combo, k)
        if not (got in v if isinstance(v, list) else got == v):
            return False
    return True


def _expand_block(where: str, block: Mapping[str, Any], flat_base: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The axis assignments of one block: grid x zip, then conditional axes where they apply."""
    combos: list[dict[str, Any]] = [{}]
    if "grid" in block:
        combos = _cross(combos, _grid(f"{where}grid", block["grid"]), where)
    if "zip" in block:
        combos = _cross(combos, _zip(f"{where}zip", block["zip"]), where)
    conditions = block.get("conditions", [])
    if not isinstance(conditions, list):
        raise ConfigError(f"{where}conditions: expected a list of {{when: ..., grid: ...}} entries")
    for i, cond in enumerate(conditions):
        cw = f"{where}conditions[{i}]"
        _check_keys(cw, cond, CONDITION_KEYS)
        if "when" not in cond or not isinstance(cond["when"], Mapping):
            raise ConfigError(f"{cw}: needs a 'when' mapping, e.g. when: {{norm.name: gn}}")
        extra: list[dict[str, Any]] = [{}]
        if "grid" in cond:
            extra = _cross(extra, _grid(f"{cw}.grid", cond["grid"]), cw)
        if "zip" in cond:
            extra = _cross(extra, _zip(f"{cw}.zip", cond["zip"]), cw)
        combos = [c2 for c in combos for c2 in (_cross([c], extra, cw) if _matches(flat_base, c, cond["when"]) else [c])]
    return combos


def _seeds(value: Any) -> list[int]:
    """Seeds from a list or a count."""
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        raise ConfigError(f"seeds: expected a list of ints or a count, got {value!r}")
    seeds = list(range(value)) if isinstance(value, int) else value
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of ints or a positive count, got {value!r}")
    return seeds


def expand(spec: Mapping[str, Any], overrides: list[str] | None = None, source: str = "sweep") -> Sweep:
    """Expand a spec (plus key=value overrides of its base) into validated, de-duplicated runs."""
    _check_keys(source, spec, SPEC_KEYS)
    name = spec.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ConfigError(f"{source}: 'name' must be a folder name (letters, digits, '_', '-'), got {name!r}")
    base = spec.get("base", {}) or {}
    if not isinstance(base, Mapping):
        raise ConfigError(f"{source}: base: expected a mapping of run-config keys")
    flat_base = {**config.flatten(base), **config.flatten(config.parse_overrides(overrides or []))}

    blocks = spec.get("blocks")
    top = {k: spec[k] for k in BLOCK_KEYS if k in spec}
    if blocks is None:
        combos = _expand_block(f"{source}: ", top, flat_base)
    else:
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError(f"{source}: blocks: expected a non-empty list of {{grid, zip, conditions}} mappings")
        combos = []
        for i, block in enumerate(blocks):
            _check_keys(f"{source}: blocks[{i}]", block, BLOCK_KEYS)
            inner = _expand_block(f"{source}: blocks[{i}].", block, flat_base)
            combos += _cross(inner, _expand_block(f"{source}: ", top, flat_base), f"{source}: blocks[{i}]") if top else inner
    if "seeds" in spec:
        combos = _cross(combos, [{"seed": s} for s in _seeds(spec["seeds"])], f"{source}: seeds")

    exclude = spec.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, Mapping) for e in exclude):
        raise ConfigError(f"{source}: exclude: expected a list of mappings, e.g. - {{norm.name: bn, batch_per_gpu: 2}}")
    combos = [c for c in combos if not any(_matches(flat_base, c, e) for e in exclude)]

    clash = set(config.flatten(config.parse_overrides(overrides or []))) & {k for c in combos for k in c}
    if clash:
        raise ConfigError(f"override '{sorted(clash)[0]}' conflicts with the sweep axis of the same name; change the spec instead")

    runs: dict[str, PlannedRun] = {}
    for combo in combos:
        label = ", ".join(f"{k}={v}" for k, v in combo.items()) or "the base config"
        try:
            cfg = config.normalized(config.from_dict(_nest({**flat_base, **combo})))
        except ConfigError as e:
            raise ConfigError(f"{source}: run with {label}: {e}") from None
        rid = config.run_id(cfg)
        runs.setdefault(rid, PlannedRun(rid, cfg, combo))
    if not runs:
        raise ConfigError(f"{source}: the spec expands to no runs (check exclude and conditions)")
    axes = tuple(dict.fromkeys(k for c in combos for k in c))
    return Sweep(name, str(spec.get("description", "")), tuple(runs.values()), axes, dict(spec))


def load(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and expand a sweep spec file."""
    return expand(config.load_yaml(path), overrides, source=str(path))
