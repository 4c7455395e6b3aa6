"""Where the bytes of one image come from: a file path, or a member of an archive read by offset.

A dataset's sample source is either a path (str) or a Member; read_source gives its bytes. Archive members
are read with os.pread on a file handle this process opened itself: a loader worker never uses a handle
inherited across a fork (pread also keeps no shared file position, so concurrent reads cannot interfere).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ablation.errors import DataError


class Member(NamedTuple):
    """An image stored inside an archive: its bytes are archive[offset : offset + size]."""

    archive: str  # the archive's path (one shared str per archive)
    offset: int  # of the member's data in the archive file (inner tars' members included)
    size: int
    name: str  # the member's path inside the archive, e.g. "n01440764.tar/n01440764_10026.JPEG"

    def __str__(self) -> str:
        return f"{self.archive}:{self.name}"


Source = str | Member  # a sample's bytes: a file path or an archive member

_handles: dict[str, int] = {}


def open_archives() -> list[str]:
    """The archives this process holds a descriptor of."""
    return sorted(_handles)


def close_handles() -> None:
    """Close this process's archive descriptors (a forked child runs it first: it opens its own)."""
    for fd in _handles.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _handles.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=close_handles)


def _handle(archive: str) -> int:
    """This process's read-only descriptor of an archive, opened on first use."""
    fd = _handles.get(archive)
    if fd is None:
        try:
            fd = os.open(archive, os.O_RDONLY)
        except OSError as exc:
            raise DataError(f"cannot open archive {archive}: {exc.strerror}; restore it, or run "
                            f"`ablation data index {os.path.dirname(archive)}` again if it moved") from exc
        _handles[archive] = fd
    return fd


def read_member(m: Member) -> bytes:
    """The member's bytes, read by offset; a short read (a truncated archive) is a one-line DataError."""
    fd = _handle(m.archive)
    chunks, got = [], 0
    while got < m.size:  # pread may return less than asked (signals, network file systems)
        chunk = os.pread(fd, m.size - got, m.offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    if got < m.size:
        raise DataError(f"archive {m.archive} ends inside member {m.name} (needs {m.offset + m.size} bytes, has "
                        f"{m.offset + got}): it is truncated; download it again, then run "
                        f"`ablation data index {os.path.dirname(m.archive)}`")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_source(src: Source) -> bytes:
    """The bytes of a sample: the file's, or the archive member's."""
    if isinstance(src, Member):
        return read_member(src)
    with open(src, "rb") as f:
        return f.read()
