"""Which algorithms take each algorithm-specific option: one table for make_algorithm and
for hil.config's check of a run's YAML (an option set for an algorithm that does not take
it is an error naming the option, never silently ignored)."""

from __future__ import annotations

# the threshold transfer's knobs (hil.algorithms.residual._Buffered), the choppers
# (hil.algorithms.chopped) and mixed precision's (hil.algorithms.mixed)
_BUFFER = ("rlv2", "ttv2", "chopped_ttv2", "agad")
_MIXED = ("mixed_precision",)
_TWO_TILE = ("tiki_taka", "residual") + _BUFFER  # hil.algorithms.residual._TwoTile
OPTIONS: dict[str, tuple[str, ...]] = {
    "transfer_unit": _TWO_TILE,
    "buffer_granularity": _BUFFER, "max_steps": _BUFFER, "forget_buffer": _BUFFER,
    "momentum": _BUFFER, "buffer_cap": _BUFFER,
    "in_chop_prob": ("chopped_ttv2", "agad"), "in_chop_random": ("chopped_ttv2", "agad"),
    "out_chop_prob": ("chopped_ttv2",), "tail_weightening": ("agad",),
    "granularity": _MIXED, "n_rows_per_transfer": _MIXED, "random_row": _MIXED,
    "n_x_bins": _MIXED, "n_d_bins": _MIXED, "stoc_round_x": _MIXED, "stoc_round_d": _MIXED,
}
