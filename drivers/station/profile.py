"""Station profiles (drivers/profiles/<instruments>.yaml): which instruments, how the chip's
lines are wired to the matrix, the physical SET/RESET pulses, the read, the conductance map
and the station limits; validated by pydantic so a bad file fails in one line (file, field)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.profile import PulseShape, StationLimits, profile_path
from hil.config import load_yaml, validated
from hil.errors import ConfigError

DIALECTS = ("keysight", "keithley")
# Matrix geometry per dialect: (instrument inputs per card, DUT outputs per card, max cards).
# Keysight B2200A: 14 inputs x 12 outputs per B2210A card, 4 card slots (B2200A User's Guide,
# "Specifications"; E5250A with E5252A cards: 10 x 12, 4 slots, E5250A User's Guide ch. 1).
# Keithley 707B with 7174A cards: rows A-H (8) x columns 1-12 per card, 6 slots
# (707B Reference Manual 707B-901-01, Section 2 "Channel identification"; 708B: 1 slot).
MATRIX_GEOMETRY = {"keysight": (14, 12, 4), "keithley": (8, 12, 6)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Instrument(_Strict):
    """One instrument: its VISA resource and what its *IDN? must contain."""

    resource: str = Field(min_length=1)
    idn_contains: str = Field(min_length=1)


class Smu(Instrument):
    channel: Literal["a", "b", 1, 2] = 1  # B2902: channel 1/2; 2602B: smua/smub


class MatrixFrame(Instrument):
    """A further mainframe of the same matrix model (a second B2200A / E5250A on the bus, a
    second 707B on the LAN): the SMU force, ground and sense lines are wired to the same input
    numbers on every frame (a triax tee per line), and its outputs continue the numbering of
    the frames before it (frame 2 output 1 follows the last output of frame 1)."""

    cards: int = Field(ge=1)
    # Keithley: this 707B is node N of the 2600B's TSP-Link network (the SMU is node 1, the
    # master): the driver reaches it through the SMU's scripts (node[N].channel...), so a whole
    # batch of devices (routes, trains and reads) is one message the SMU runs by itself
    # (2600B Reference Manual, "TSP-Link system expansion interface"; 707B Reference Manual
    # 707B-901-01 Rev. B, Section 7: every channel function is "TSP-Link accessible: Yes").
    # ``resource`` is then not opened.
    tsplink_node: int | None = Field(default=None, ge=2, le=64)


class Matrix(Instrument):
    """Which matrix inputs (1-based; Keithley rows A=1, B=2, ...) carry the SMU's force line,
    the ground (GNDU or a grounded SMU) and optionally the SMU's sense line; ``expansion``:
    further mainframes when the chip has more lines than one frame has outputs."""

    cards: int = Field(ge=1)
    tsplink_node: int | None = Field(default=None, ge=2, le=64)  # as MatrixFrame's
    expansion: list[MatrixFrame] = Field(default_factory=list, max_length=7)
    force_input: int = Field(ge=1)
    ground_input: int = Field(ge=1)
    sense_input: int | None = Field(default=None, ge=1)
    # How a route change switches its relays. 'break-before-make': every old relay opens and
    # settles before a new one closes (open + close settle times; safe for any wiring and any
    # source level). 'cold': the old and the new relays switch together (the longer of the two
    # settle times) and the driver only ever switches them with the SMU sourcing 0 V, so the
    # moment both columns may touch nothing is biased ("cold switching"; 707B Reference
    # Manual 707B-901-01 Rev. B, Section 7 channel.connectrule: channel.OFF takes the maximum
    # of the open and close settle times; B2200A User's Guide, [:ROUTe]:CONNection:SEQuence
    # NSEQ with the single-route rule SROUte).
    switching: Literal["break-before-make", "cold"] = "break-before-make"

    @model_validator(mode="after")
    def _distinct(self) -> Matrix:
        used = [i for i in (self.force_input, self.ground_input, self.sense_input) if i]
        if len(set(used)) != len(used):
            raise ValueError("force_input, ground_input and sense_input must differ")
        return self


def _lines(value: object) -> object:
    """'1-8' or [1, 2, ...]: matrix outputs (1-based, card-major: card 2 output 1 is 13)."""
    if isinstance(value, str):
        first, sep, last = value.partition("-")
        if not sep or not first.strip().isdigit() or not last.strip().isdigit():
            raise ValueError("lines must be 'FIRST-LAST' or a list of outputs")
        return list(range(int(first), int(last) + 1))
    return value


class StationArray(_Strict):
    """One crossbar array: the matrix output wired to each row line and each column line."""

    rows: int = Field(ge=1, le=4096)
    cols: int = Field(ge=1, le=4096)
    row_lines: list[int]
    col_lines: list[int]

    _split = field_validator("row_lines", "col_lines", mode="before")(_lines)

    @model_validator(mode="after")
    def _count(self) -> StationArray:
        if len(self.row_lines) != self.rows or len(self.col_lines) != self.cols:
            raise ValueError(f"{len(self.row_lines)} row lines / {len(self.col_lines)} column "
                             f"lines for a {self.rows}x{self.cols} array")
        return self


class TilePlace(_Strict):
    array: int = Field(ge=0)
    row: int = Field(ge=0)
    col: int = Field(ge=0)


class ReadSpec(_Strict):
    """The read: a DC voltage below every device's switching threshold, measured for the
    aperture (integration time) under a current compliance."""

    voltage_v: float
    aperture_s: float = Field(gt=0)
    compliance_a: float = Field(gt=0)


class Conductance(_Strict):
    """Conductance-to-weight map: G_min..G_max as weights -1..1 (w = (G - G_ref)/scale),
    or the map a calibration file wrote (``calib``)."""

    g_min_s: float | None = Field(default=None, gt=0)
    g_max_s: float | None = Field(default=None, gt=0)
    calib: str | None = None

    @model_validator(mode="after")
    def _one(self) -> Conductance:
        pair = self.g_min_s is not None and self.g_max_s is not None
        if pair == (self.calib is not None):
            raise ValueError("give g_min_s and g_max_s, or calib")
        if pair and self.g_max_s <= self.g_min_s:
            raise ValueError("g_max_s must exceed g_min_s")
        return self

    @property
    def g_ref(self) -> float:
        return 0.5 * (self.g_min_s + self.g_max_s)

    @property
    def weight_scale(self) -> float:
        return 0.5 * (self.g_max_s - self.g_min_s)


class SimSettings(_Strict):
    """The simulated instruments' device physics (only ``?sim=`` and serve-virtual-chip)."""

    switching_threshold_v: float = Field(default=0.5, gt=0)  # |V| below it moves nothing
    current_noise_a: float = Field(default=0.0, ge=0)  # SMU current measurement noise (std)


class StationProfile(_Strict):
    """A station profile: SMU + switch matrix wired to a chip's crossbar arrays."""

    name: str
    description: str = ""
    dialect: Literal["keysight", "keithley"]
    smu: Smu
    matrix: Matrix
    arrays: list[StationArray] = Field(min_length=1)
    tiles: dict[str, TilePlace] = Field(default_factory=dict)
    pulses: dict[Literal["potentiate", "depress"], PulseShape]
    pulse_period_s: float = Field(gt=0)
    dw_min: float = Field(gt=0)  # nominal weight change of one pulse (from calibration)
    read: ReadSpec
    conductance: Conductance
    limits: StationLimits
    batch: int = Field(default=64, ge=1, le=4096)  # devices per message before an error check
    sim: SimSettings = SimSettings()

    @model_validator(mode="after")
    def _consistent(self) -> StationProfile:
        inputs, per_card, max_cards = MATRIX_GEOMETRY[self.dialect]
        if self.matrix.cards > max_cards:
            raise ValueError(f"matrix.cards={self.matrix.cards}: a {self.dialect} matrix "
                             f"holds at most {max_cards}")
        nodes = [self.matrix.tsplink_node] + [f.tsplink_node for f in self.matrix.expansion]
        if any(nodes):
            if self.dialect != "keithley":
                raise ValueError("matrix.tsplink_node: TSP-Link joins Keithley instruments "
                                 "(dialect keithley)")
            if None in nodes or len(set(nodes)) != len(nodes):
                raise ValueError(f"matrix.tsplink_node: every matrix frame needs its own "
                                 f"TSP-Link node (got {nodes})")
        resources = [self.matrix.resource]
        for k, frame in enumerate(self.matrix.expansion):
            if frame.cards > max_cards:
                raise ValueError(f"matrix.expansion.{k}.cards={frame.cards}: a {self.dialect} "
                                 f"matrix holds at most {max_cards}")
            if frame.resource in resources:
                raise ValueError(f"matrix.expansion.{k}.resource={frame.resource!r} is "
                                 "already a frame of this matrix")
            resources.append(frame.resource)
        if (self.dialect == "keysight" and self.matrix.switching == "cold"
                and self.matrix.sense_input is not None):
            raise ValueError("matrix.switching=cold uses the B2200A's single-route rule, "
                             "which allows one input per output: drop sense_input or use "
                             "break-before-make")
        for name in ("force_input", "ground_input", "sense_input"):
            value = getattr(self.matrix, name)
            if value is not None and value > inputs:
                raise ValueError(f"matrix.{name}={value}: the matrix has {inputs} inputs")
        outputs = per_card * sum(self.frame_cards)
        seen: set[int] = set()
        for k, a in enumerate(self.arrays):
            for line in (*a.row_lines, *a.col_lines):
                if not 1 <= line <= outputs:
                    raise ValueError(f"arrays.{k}: line {line} outside the matrix outputs "
                                     f"1..{outputs}")
                if line in seen:
                    raise ValueError(f"arrays.{k}: matrix output {line} wired twice")
                seen.add(line)
        if set(self.pulses) != {"potentiate", "depress"}:
            raise ValueError("pulses needs potentiate and depress")
        for name, p in self.tiles.items():
            if p.array >= len(self.arrays):
                raise ValueError(f"tiles.{name}.array={p.array} but there are "
                                 f"{len(self.arrays)} arrays")
        return self

    @property
    def tsplink_nodes(self) -> list[int] | None:
        """The TSP-Link node of each matrix frame, or None when the host talks to each."""
        if self.matrix.tsplink_node is None:
            return None
        return [self.matrix.tsplink_node] + [f.tsplink_node for f in self.matrix.expansion]

    @property
    def frame_cards(self) -> list[int]:
        """Cards of each matrix frame: the first, then the expansion frames."""
        return [self.matrix.cards] + [f.cards for f in self.matrix.expansion]

    def locate(self, output: int) -> tuple[int, int]:
        """(frame index, output on that frame) of a global matrix output (1-based)."""
        per_card = MATRIX_GEOMETRY[self.dialect][1]
        for frame, cards in enumerate(self.frame_cards):
            if output <= cards * per_card:
                return frame, output
            output -= cards * per_card
        raise ValueError(f"matrix output beyond the {len(self.frame_cards)} frames")


def load_station_profile(name_or_path: str) -> StationProfile:
    """Read and validate a station profile; ConfigError names the file and the field."""
    path = profile_path(name_or_path)
    try:
        raw = load_yaml(Path(path).read_text())
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(str(path), "profile", f"no such profile file (shipped: {known})") \
            from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "yaml", str(exc).replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "<top>", "a profile must be a mapping")
    return station_profile(raw, str(path))


def station_profile(raw: dict, where: str = "<profile>") -> StationProfile:
    """Validate a profile mapping (files, tests and benchmarks build them)."""
    if "dialect" not in raw:
        raise ConfigError(where, "dialect", "not a station profile: give dialect "
                          f"({' or '.join(DIALECTS)}), smu, matrix, arrays, pulses, read, ...")
    return validated(StationProfile, raw, where)
