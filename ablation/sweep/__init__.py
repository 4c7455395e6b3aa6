"""Sweep stage: a sweep spec becomes run configs in a sweep folder, submitted through an executor. Torch-free.

spec (axes -> run configs), cluster (profiles, SLURM queries), status (run states), launch (folder, plan, submit).
"""

import importlib
import warnings

# The names of the flat module ablation.sweep, which is now ablation.sweep.spec (deprecated here).
_SPEC_NAMES = ("load", "expand", "Sweep", "PlannedRun", "SPEC_KEYS", "BLOCK_KEYS", "CONDITION_KEYS")


def __getattr__(name: str):
    """`ablation.sweep.load` and the flat module's other names: ablation.sweep.spec's, with a DeprecationWarning."""
    if name not in _SPEC_NAMES:
        raise AttributeError(f"module 'ablation.sweep' has no attribute {name!r}")
    warnings.warn(f"ablation.sweep.{name} is now ablation.sweep.spec.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("ablation.sweep.spec"), name)
