"""The ArC TWO station profile (drivers/profiles/arc2.yaml): channel mapping, pulse shapes
per polarity, read voltage, the nominal conductance-to-weight map, tile placements and the
station limits, validated by pydantic so a bad file fails in one line."""

from __future__ import annotations

from pydantic import Field, model_validator

from drivers.arc2.mapping import DEFAULT_MAPPING
from drivers.profile import ArraySpec, Pulses, StationLimits, _Strict, load_model


class Position(_Strict):
    """A fixed place for a named tile: its first wordline (row) and bitline (column)."""

    row: int = Field(ge=0, le=31)
    col: int = Field(ge=0, le=31)


class NominalMap(_Strict):
    """w = (G - g_ref) / weight_scale, until a calibration file gives the measured map."""

    g_ref: float = Field(gt=0)  # siemens
    weight_scale: float  # siemens per weight unit (nonzero; negative flips polarity)

    @model_validator(mode="after")
    def _nonzero(self) -> NominalMap:
        if self.weight_scale == 0:
            raise ValueError("weight_scale must be nonzero")
        return self


class Arc2Profile(_Strict):
    """An ArC TWO station profile."""

    name: str
    description: str = ""
    mapping: str = DEFAULT_MAPPING
    read_voltage_v: float
    dw_min: float = Field(gt=0)  # nominal weight change of one pulse (weight units)
    pulses: Pulses
    weight_map: NominalMap
    tiles: dict[str, Position] = Field(default_factory=dict)
    limits: StationLimits

    def arrays(self, shape: tuple[int, int]) -> list[ArraySpec]:
        """The one array in the socket, as the interlock sees it."""
        return [ArraySpec(rows=shape[0], cols=shape[1])]


def load_arc2_profile(name_or_path: str = "arc2") -> Arc2Profile:
    """Read and validate an ArC TWO profile; ConfigError names the file and the field."""
    return load_model(name_or_path, Arc2Profile)
