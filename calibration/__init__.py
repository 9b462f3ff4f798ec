"""Calibration: measure every device of a chip, fit its response, zero-shift, build a twin."""

from calibration.fit import FAMILIES, FitResult, fit_traces

__all__ = ["FAMILIES", "FitResult", "fit_traces"]
