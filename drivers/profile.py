"""Station profiles: the YAML per setup naming the chip, the physical pulses, the tile map
and the station safety limits, validated by pydantic so a bad file fails in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hil.config import load_yaml, validated
from hil.errors import ConfigError

PROFILE_DIR = Path(__file__).with_name("profiles")
DTYPE_MAX = {"int8": 127, "int16": 32767, "int32": 2**31 - 1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class PulseShape(_Strict):
    """The physical pulse that realises one pulse of a polarity."""

    amplitude_v: float
    width_s: float = Field(gt=0)
    compliance_a: float = Field(gt=0)


class Pulses(_Strict):
    potentiate: PulseShape
    depress: PulseShape


class ArraySpec(_Strict):
    """One physical crossbar array on the chip."""

    rows: int = Field(ge=1, le=1 << 20)
    cols: int = Field(ge=1, le=1 << 20)


class Placement(_Strict):
    """A fixed place for a named tile: array index and top-left device."""

    array: int = Field(ge=0)
    row: int = Field(ge=0)
    col: int = Field(ge=0)


class StationLimits(_Strict):
    """What this station may ever apply; checked before any byte is sent.

    ``max_pulses_per_command``: the largest |count| of one device in one command.
    ``max_pulses_per_step``: the most pulses one algorithm step may apply to one device,
    summed over every command the step is split into (absent: one command's worth)."""

    max_amplitude_v: float = Field(gt=0)
    max_width_s: float = Field(gt=0)
    max_compliance_a: float = Field(gt=0)
    max_pulses_per_command: int = Field(ge=1)
    max_pulses_per_step: int = Field(ge=1, le=2**31 - 1)
    allowed_rows: tuple[int, int] = Field(strict=False)  # a YAML list; its items stay strict
    allowed_cols: tuple[int, int] = Field(strict=False)

    @model_validator(mode="before")
    @classmethod
    def _default_step_budget(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("max_pulses_per_step") is None \
                and "max_pulses_per_command" in data:
            data = {**data, "max_pulses_per_step": data["max_pulses_per_command"]}
        return data

    @model_validator(mode="after")
    def _ranges(self) -> StationLimits:
        for name in ("allowed_rows", "allowed_cols"):
            lo, hi = getattr(self, name)
            if lo < 0 or hi < lo:
                raise ValueError(f"{name} must be [first, last] with 0 <= first <= last")
        return self


class ChipSpec(_Strict):
    idn_contains: str = Field(min_length=1)
    pulse_dtype: Literal["int8", "int16", "int32"] = "int16"


class Profile(_Strict):
    """A station profile (drivers/profiles/NAME.yaml)."""

    name: str
    description: str = ""
    chip: ChipSpec
    pulses: Pulses
    arrays: list[ArraySpec] = Field(min_length=1)
    tiles: dict[str, Placement] = Field(default_factory=dict)
    limits: StationLimits

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        dmax = DTYPE_MAX[self.chip.pulse_dtype]
        if self.limits.max_pulses_per_command > dmax:
            raise ValueError(
                f"limits.max_pulses_per_command={self.limits.max_pulses_per_command} does not "
                f"fit chip.pulse_dtype={self.chip.pulse_dtype} (max {dmax})"
            )
        for name, p in self.tiles.items():
            if p.array >= len(self.arrays):
                raise ValueError(f"tiles.{name}.array={p.array} but there are "
                                 f"{len(self.arrays)} arrays")
        return self


def profile_path(name_or_path: str) -> Path:
    """A bare name means drivers/profiles/NAME.yaml; anything else is a file path."""
    if "/" not in name_or_path and not name_or_path.endswith((".yaml", ".yml")):
        return PROFILE_DIR / f"{name_or_path}.yaml"
    return Path(name_or_path)


def load_profile(name_or_path: str) -> Profile:
    """Read and validate a profile; ConfigError names the file and the field."""
    return load_model(name_or_path, Profile)


M = TypeVar("M", bound=BaseModel)


def load_model(name_or_path: str, model: type[M]) -> M:
    """Read a profile YAML (a name under drivers/profiles/ or a path) into ``model``;
    ConfigError names the file and the field."""
    path = profile_path(name_or_path)
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise ConfigError(str(path), "profile",
                          f"no such profile file (shipped: {known})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "profile", getattr(exc, "strerror", None) or str(exc)
                          ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "yaml", str(exc).replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "<top>", "a profile must be a mapping")
    return validated(model, raw, str(path))


NUMPY_DTYPES_BY_NAME = {"int8": "<i1", "int16": "<i2", "int32": "<i4"}
