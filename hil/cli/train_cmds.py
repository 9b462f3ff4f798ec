"""CLI commands of this area, registered on the shared app (heavy imports stay inside commands)."""

from __future__ import annotations

from hil.cli import app  # noqa: F401
