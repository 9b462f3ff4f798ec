"""Station profiles for the tests: a shipped profile with some fields changed, written to a
temporary file (the station tests open backends from profile files, as a lab does)."""

from __future__ import annotations

from pathlib import Path

import yaml

from drivers.profile import profile_path


def shipped(name: str) -> dict:
    """A shipped station profile as a mapping, with dw_min 0.02 (the tests' sim:// devices)."""
    raw = yaml.safe_load(profile_path(name).read_text())
    raw["dw_min"] = 0.02
    return raw


def write_changed(tmp_path: Path, raw: dict, tag: str, **changes: object) -> str:
    """``raw`` with dotted-key ``changes`` ("read.voltage_v": 0.2), written; its path."""
    for key, value in changes.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    path = tmp_path / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)
