"""Import published pulse-response data: a CSV whose columns are traces of one device.

Column j holds the reads after each pulse of one direction, the columns alternate
potentiation / depression (like ``gong_et_al.csv``: column 1 after each potentiation
pulse, column 2 after each depression pulse). The columns are joined into one trace:
the first read has no pulse before it, every later read follows one pulse.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from hil.errors import ConfigError


def load_csv_traces(path: Path | str, first: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return states [T, 1] and directions [T - 1]; ``first`` is the first column's polarity."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "file", "no such file")
    if first not in (1, -1):
        raise ValueError("first must be +1 or -1")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(str(path), "file", "not a text CSV file") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(str(path), "file", "no data rows")
    n_cols = len(rows[0])
    values = np.empty((len(rows), n_cols))
    for i, row in enumerate(rows, start=1):
        if len(row) != n_cols:
            raise ConfigError(str(path), f"row {i}",
                              f"has {len(row)} fields, the first row has {n_cols} (ragged columns)")
        for j, cell in enumerate(row, start=1):
            try:
                v = float(cell)
            except ValueError:
                raise ConfigError(str(path), f"row {i}, column {j}",
                                  f"{cell.strip()!r} is not a number") from None
            if math.isinf(v):
                raise ConfigError(str(path), f"row {i}, column {j}", "infinite value")
            values[i - 1, j - 1] = v
    states = values.T.reshape(-1, 1)  # column after column
    n_rows = values.shape[0]
    directions = np.concatenate([np.full(n_rows, first * (-1) ** j) for j in range(n_cols)])[1:]
    if states.shape[0] < 3 or np.nanmax(states) == np.nanmin(states):
        raise ConfigError(str(path), "data", "the trace has no steps (constant or too short)")
    return states, directions.astype(np.int64)
