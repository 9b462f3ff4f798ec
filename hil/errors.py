"""Typed errors of the stack: every failure names the tile and operation it hit."""

from __future__ import annotations


class HilError(Exception):
    """Base of every analog-hil error."""


class BackendError(HilError):
    """An operation on a backend failed; carries the tile name and operation."""

    def __init__(self, message: str, *, tile: str | None = None, op: str | None = None):
        self.tile = tile
        self.op = op
        where = ", ".join(p for p in (f"tile {tile!r}" if tile else "", op or "") if p)
        super().__init__(f"{message} [{where}]" if where else message)


class BackendURLError(HilError, ValueError):
    """A backend URL or one of its query parameters is malformed or unknown."""


class UnsupportedOperation(BackendError):
    """The backend does not declare the capability the operation needs."""


class SafetyLimitError(BackendError):
    """A command would exceed the station's safety limits; nothing was sent."""


class NonFiniteError(SafetyLimitError, ValueError):
    """A value that must be finite (gradient, layer input or error, rate, target, count)
    is NaN or infinite; refused before anything was sent."""


class InstrumentTimeout(BackendError):
    """The instrument did not answer in time (after the allowed retries)."""


class ProtocolError(BackendError):
    """The instrument sent a malformed or unexpected reply."""


class ConfigError(HilError, ValueError):
    """A configuration or input file is invalid; names the file and the field."""

    def __init__(self, path: str, field: str, message: str):
        self.path = path
        self.field = field
        self.message = message
        super().__init__(f"{path}: {field}: {message}")
