"""Exact, fast reading of the YAML the harness writes, for run folders by the thousand. Torch-free.

`load(text)` returns what `yaml.safe_load(text)` returns. Text in the block style `yaml.safe_dump`
writes (nested mappings, sequences of scalars, plain and single-quoted scalars, `[]` and `{}`) is
read line by line: each distinct line is taken apart once (10,000 config.yaml files share most of
their lines) and each plain scalar is resolved by PyYAML's own resolver and SafeConstructor, so
ints, floats, booleans, nulls and dates come out exactly as PyYAML makes them. Anything else (flow
collections, multi-line or double-quoted scalars, anchors, tags, comments, document markers, tabs,
non-ASCII text) is handed whole to yaml.safe_load (not the C loader, which accepts some text that
safe_load refuses).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_RESOLVER = yaml.resolver.Resolver()
_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_IMMUTABLE = (str, int, float, bool, type(None))
_KEY = re.compile(r"( *)([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?\Z")
_ITEM = re.compile(r"( *)- (.*)\Z")
_ODD = re.compile(r"[^\x20-\x7e\n]")  # tabs, CR, control and non-ASCII characters: PyYAML's to judge
_START = set("-?:,[]{}#&*!|>'\"%@`")  # a plain scalar starting with one of these is not read here
_EMPTY_LIST, _EMPTY_DICT = object(), object()
_MAX_MEMO = 200_000


class _Unsupported(Exception):
    """The text is outside the subset read here: PyYAML reads it."""


_scalars: dict[str, Any] = {}
_lines: dict[str, tuple[str, int, Any, Any]] = {}


def _plain(text: str) -> Any:
    """A plain scalar's value, as PyYAML resolves and constructs it."""
    try:
        return _scalars[text]
    except KeyError:
        pass
    if not text or text[0] in _START and not (text[0] == "-" and len(text) > 1 and text[1] in "0123456789."):
        raise _Unsupported
    if ": " in text or " #" in text or text.endswith(":") or text != text.strip():
        raise _Unsupported
    tag = _RESOLVER.resolve(yaml.nodes.ScalarNode, text, (True, False))
    construct = _CONSTRUCTOR.yaml_constructors.get(tag)
    if construct is None or tag.endswith((":merge", ":value")):
        raise _Unsupported
    try:
        value = construct(_CONSTRUCTOR, yaml.nodes.ScalarNode(tag, text))
    except Exception:  # noqa: BLE001 - PyYAML's to judge (and to word the error)
        raise _Unsupported from None
    if not isinstance(value, _IMMUTABLE):
        raise _Unsupported  # dates and the like: PyYAML reads the file
    if len(_scalars) > _MAX_MEMO:
        _scalars.clear()
    _scalars[text] = value
    return value


def _value(text: str) -> Any:
    """A value written after 'key: ' or '- '."""
    if text == "[]":
        return _EMPTY_LIST
    if text == "{}":
        return _EMPTY_DICT
    if text[:1] == "'":
        inner = text[1:-1]
        if len(text) < 2 or text[-1] != "'" or "'" in inner.replace("''", ""):
            raise _Unsupported
        return inner.replace("''", "'")
    return _plain(text)


def _line(line: str) -> tuple[str, int, Any, Any]:
    """(kind, indent, key, value) of one line: kind 'key' (a key and its scalar), 'open' (a key whose block follows), 'item'."""
    try:
        return _lines[line]
    except KeyError:
        pass
    m = _KEY.match(line)
    if m:
        indent, key, rest = len(m.group(1)), _plain(m.group(2)), m.group(3)
        parsed = ("open", indent, key, None) if rest is None or rest == "" else ("key", indent, key, _value(rest))
    else:
        m = _ITEM.match(line)
        if not m:
            raise _Unsupported
        parsed = ("item", len(m.group(1)), None, _value(m.group(2)))
    if len(_lines) > _MAX_MEMO:
        _lines.clear()
    _lines[line] = parsed
    return parsed


def _fresh(v: Any) -> Any:
    """A new [] or {} for the markers; other values as they are (immutable)."""
    if v is _EMPTY_LIST:
        return []
    if v is _EMPTY_DICT:
        return {}
    return v


def _parse(text: str) -> Any:
    """The block-style subset; raises _Unsupported for anything else."""
    if _ODD.search(text) or not text.strip():
        raise _Unsupported
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    root: dict[Any, Any] = {}
    stack: list[tuple[int, Any]] = [(0, root)]  # (indent of its keys or dashes, container)
    pending: tuple[Any, Any, int] | None = None  # (mapping, key, indent) of a key whose block is next
    for raw in lines:
        kind, indent, key, value = _line(raw)
        if pending is not None:
            parent, pkey, pindent = pending
            pending = None
            if kind == "item" and indent >= pindent:
                parent[pkey] = []
                stack.append((indent, parent[pkey]))
            elif kind != "item" and indent > pindent:
                parent[pkey] = {}
                stack.append((indent, parent[pkey]))
            else:
                parent[pkey] = None  # 'key:' with nothing under it
        while True:
            top_indent, top = stack[-1]
            if top_indent == indent and isinstance(top, list if kind == "item" else dict):
                break
            if top_indent < indent or len(stack) == 1:
                raise _Unsupported
            stack.pop()
        if kind == "item":
            top.append(_fresh(value))
        elif kind == "key":
            top[key] = _fresh(value)
        else:
            top[key] = None
            pending = (top, key, indent)
    return root


def load(text: str) -> Any:
    """What yaml.safe_load(text) returns (and its errors where the text is not valid YAML)."""
    try:
        return _parse(text)
    except _Unsupported:
        return yaml.safe_load(text)
