"""Output paths checked before any work starts: a command that would fail at its first
write (``--out`` under a file, an unwritable directory, an existing result) says so in one
line before it measures, fits or trains anything."""

from __future__ import annotations

import os
from pathlib import Path

from hil.errors import ConfigError


def check_dir(path: Path, field: str = "--out") -> Path:
    """``path`` is, or can be created as, a writable directory (nothing is created here)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(str(path), field, f"{probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(str(path), field, f"directory {probe} is not writable")
    return path


def check_new_file(path: Path, force: bool, field: str = "--out") -> Path:
    """``path`` can be written as a new file: its directory is writable, and an existing
    file is replaced only with ``force``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(str(path), field, "is a directory; give a file name")
    if path.exists() and not force:
        raise ConfigError(str(path), field, "exists; pass --force to replace it (it stays "
                                            "until the new one is complete)")
    check_dir(path.parent, field)
    return path
