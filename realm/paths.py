"""Which file a path names, for the checks commands make on their output before any work."""

from __future__ import annotations

import os
import sys


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether a and b name one existing file, however spelled: relative or absolute, through `..`, symlinks or hard
    links."""
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def reads_from(path: str | os.PathLike) -> bool:
    """Whether path names what standard input reads: the file it was redirected from, or its pipe (/dev/stdin)."""
    try:
        here, there = os.stat(path), os.fstat(sys.stdin.fileno())
    except (OSError, ValueError, AttributeError):  # no such path, or no standard input at all
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
