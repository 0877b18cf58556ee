"""Writing a file so that a concurrent reader sees the old one or the whole new one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(target: Path, suffix: str = "") -> Iterator[Path]:
    """A fresh temporary path in `target`'s directory to write to; when the block ends
    normally it replaces `target` in one rename, otherwise it is removed."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
