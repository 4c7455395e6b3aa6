"""Names that moved still import from their old places, with a DeprecationWarning, as the very same objects."""

from __future__ import annotations

import importlib

import pytest

import ablation
import ablation.data

# (old module, name, the module that holds it now): the flat module ablation.data's names.
DATA_MOVES = [("ablation.data", name, module) for name, module in ablation.data._MOVED.items()]


@pytest.mark.parametrize(("old", "name", "new"), DATA_MOVES, ids=[f"{old}.{name}" for old, name, _ in DATA_MOVES])
def test_old_data_paths_resolve_to_the_same_objects(old: str, name: str, new: str) -> None:
    """`from ablation.data import SplitTrainTransform` (the flat module's names): the new module's object."""
    new_module = importlib.import_module(new)
    assert name in vars(new_module), f"{new} does not define {name}"
    assert name not in vars(importlib.import_module(old)), f"{old}.{name} is defined there, not forwarded"
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} is now {new}\.{name}"):
        namespace: dict[str, object] = {}
        exec(f"from {old} import {name}", namespace)
    assert namespace[name] is vars(new_module)[name]


@pytest.mark.parametrize("old", ["ablation.data", "ablation.data.layout", "ablation.data.pipelines"])
def test_unknown_names_still_raise(old: str) -> None:
    """The hook forwards only the moved names."""
    with pytest.raises(ImportError):
        exec(f"from {old} import NoSuchName", {})


@pytest.mark.parametrize("name", sorted(ablation.MOVED))
def test_old_flat_module_names_resolve(name: str) -> None:
    """`from ablation import report` (a flat module of old): the module at its new place."""
    with pytest.warns(DeprecationWarning, match=rf"ablation\.{name} is now {ablation.MOVED[name]}"):
        module = ablation.__getattr__(name)  # the hook itself: a name resolved once is cached, and warns no more
    assert module is importlib.import_module(ablation.MOVED[name])
