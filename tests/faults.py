"""Faults a test can inject at the operating system's edge: a disk that fills up."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock


@contextmanager
def full_disk(root: Path, free: int = 0) -> Iterator[None]:
    """Writes to files under ``root`` fail with ENOSPC once ``free`` more bytes were written there, the way
    a full disk fails ``os.write`` (the write that crosses the limit is cut short, the next one fails).
    Files elsewhere are written as usual."""
    real, prefix, left = os.write, str(Path(root).resolve()) + os.sep, [free]

    def write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not target.startswith(prefix):
            return real(fd, data)
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, bytes(memoryview(data)[: left[0]]))
        left[0] -= n
        return n

    with mock.patch.object(os, "write", write):
        yield
