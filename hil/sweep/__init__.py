"""Sweeps: a grid of ``hil train`` runs (or calibration jobs) as Ray tasks, from a laptop to a
cluster. ``spec`` reads and expands the sweep file, ``cell`` runs one cell (no Ray in it),
``runner`` submits the cells to Ray and keeps the sweep's state, ``report`` writes the table
and plots. Ray is an optional extra (``pip install 'analog-hil[sweep]'``), imported only when
a sweep runs."""

from hil.sweep.spec import Cell, Sweep, load_sweep, parse_sweep

__all__ = ["Cell", "Sweep", "load_sweep", "parse_sweep"]
