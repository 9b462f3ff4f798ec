"""What makes an emulated chip drift away from its calibration: conductance drift between
operations and ageing with the pulses a device has taken. Both are off by default.

Time is a modelled clock, never wall time, so seeded runs stay bit-identical: every tile
operation (read, read_columns, pulse, pulse_columns, mvm, outer_update) advances the
backend's clock by ``clock`` seconds before it acts (``Backend.mvm_sum``, the weighted
sum of tiles read as one array, reads the weights as they stand without a tick).

Drift (a power law in time, as aihwkit's PCM drift model, relaxing towards w = 0, the
reference conductance): a device last pulsed at t_p holds at time t

    w(t) = w(t_p) * ((t - t_p + t0) / t0) ** (-nu_i),   nu_i = drift * (1 + drift_d2d * xi_i)

(xi_i a standard normal per device drawn once from the tile's seed, nu_i clipped at 0).
It is applied lazily before each operation as the ratio of the factors at the old and the
new clock, so it composes exactly; a pulse resets t_p of the devices it moves.

Ageing (linear in the pulses N_i a device has taken, counted from ``aged``):

    dw_min_i(N) = dw_min_i * (1 + age_dw * N_i / age_n)
    gamma_i(N)  = gamma_i  * (1 + age_gamma * N_i / age_n)   (power and exp responses)

updated after each operation (within one call a device keeps its values).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from hil.backend import Tile
from hil.url import BackendURL


@dataclass(frozen=True)
class DriftAgeingConfig:
    """URL parameters ``drift``, ``drift_d2d``, ``drift_t0``, ``clock``, ``age_dw``,
    ``age_gamma``, ``age_n``, ``aged`` (see the module docstring for the formulas)."""

    drift: float = 0.0  # mean drift exponent nu
    drift_d2d: float = 0.0  # relative device-to-device spread of nu
    drift_t0: float = 1.0  # seconds
    clock: float = 1.0  # modelled seconds per tile operation
    age_dw: float = 0.0  # relative change of dw_min after age_n pulses
    age_gamma: float = 0.0  # relative change of gamma after age_n pulses
    age_n: float = 1e6  # pulses of the ageing scale
    aged: float = 0.0  # pulses every device has taken before the first operation

    @property
    def drifts(self) -> bool:
        return self.drift > 0

    @property
    def ages(self) -> bool:
        return self.age_dw != 0 or self.age_gamma != 0

    @property
    def active(self) -> bool:
        return self.drifts or self.ages

    @classmethod
    def from_url(cls, url: BackendURL) -> DriftAgeingConfig:
        d = cls()
        return cls(
            drift=url.get_float("drift", d.drift, lo=0.0, hi=1.0),
            drift_d2d=url.get_float("drift_d2d", d.drift_d2d, lo=0.0, hi=10.0),
            drift_t0=url.get_float("drift_t0", d.drift_t0, lo=1e-9),
            clock=url.get_float("clock", d.clock, lo=0.0, hi=1e9),
            age_dw=url.get_float("age_dw", d.age_dw, lo=-0.99, hi=100.0),
            age_gamma=url.get_float("age_gamma", d.age_gamma, lo=-0.99, hi=100.0),
            age_n=url.get_float("age_n", d.age_n, lo=1.0),
            aged=url.get_float("aged", d.aged, lo=0.0),
        )


class DriftAgeing:
    """The drift and ageing state of one emulated tile (clock times, pulse counts)."""

    def __init__(self, cfg: DriftAgeingConfig, tile, gen: torch.Generator):
        self.cfg = cfg
        self.tile = tile
        w = tile.w
        self.t_prog = torch.zeros_like(w, dtype=torch.float64)  # last pulse, per device
        self.t_applied = 0.0  # clock time up to which drift has been applied
        nu = cfg.drift * (1 + cfg.drift_d2d * torch.randn(w.shape, generator=gen,
                                                            device=w.device))
        self.nu = nu.clamp_min(0.0).to(torch.float64)
        self.pulses = torch.full_like(w, cfg.aged, dtype=torch.float64)
        dev = tile.devices
        self.dw0 = dev.dw_min.clone() if isinstance(dev.dw_min, torch.Tensor) else dev.dw_min
        gamma = getattr(dev.response, "gamma", None)
        self.gamma0 = gamma.clone() if isinstance(gamma, torch.Tensor) else None
        self.age()

    def tick(self) -> None:
        """Advance the clock one operation and let every device relax since t_applied."""
        be = self.tile.backend
        be.clock_s = getattr(be, "clock_s", 0.0) + self.cfg.clock
        now = be.clock_s
        if self.cfg.drifts and now > self.t_applied:
            t0 = self.cfg.drift_t0
            ratio = (now - self.t_prog + t0) / (self.t_applied - self.t_prog + t0)
            factor = ratio.pow(-self.nu)
            stuck = self.tile.devices.stuck
            if stuck is not None:
                factor = torch.where(stuck, torch.ones_like(factor), factor)
            w = self.tile.w
            w.copy_((w.double() * factor).to(w.dtype))
        self.t_applied = now

    def pulsed(self, counts: torch.Tensor) -> None:
        """Book the |counts| a call applied (a [rows, cols] map): reset their drift clock
        and age the devices."""
        moved = counts != 0
        if self.cfg.drifts:
            self.t_prog = torch.where(moved, self.t_applied, self.t_prog)
        if self.cfg.ages:
            self.pulses += counts.abs().to(torch.float64)
            self.age()

    def age(self) -> None:
        if not self.cfg.ages:
            return
        c = self.cfg
        frac = (self.pulses / c.age_n).to(torch.float32)
        dev = self.tile.devices
        if c.age_dw:
            dev.dw_min = (self.dw0 * (1 + c.age_dw * frac)).clamp_min(0.0)
        if c.age_gamma and self.gamma0 is not None:
            dev.response.gamma = (self.gamma0 * (1 + c.age_gamma * frac)).clamp_min(1e-3)

    def state(self) -> dict[str, object]:
        return {"t_prog": self.t_prog.cpu().clone(), "t_applied": self.t_applied,
                "pulses": self.pulses.cpu().clone(),
                "clock_s": getattr(self.tile.backend, "clock_s", 0.0)}

    def load(self, state: dict[str, object]) -> None:
        dev = self.tile.w.device
        self.t_prog = state["t_prog"].to(dev)
        self.t_applied = float(state["t_applied"])
        self.pulses = state["pulses"].to(dev)
        self.tile.backend.clock_s = max(getattr(self.tile.backend, "clock_s", 0.0),
                                        float(state["clock_s"]))
        self.age()


@cache
def drifting_tile_class(base: type[Tile]) -> type[Tile]:
    """``base`` (SimTile) with drift and ageing: every operation ticks the clock first;
    pulse operations book their counts (outer_update through explicit coincidence counts,
    the same draws as the fused path)."""
    from sim_backend.emulator import apply_pulse_trains, pulse_train_counts

    class DriftingTile(base):  # type: ignore[misc, valid-type]
        def __init__(self, backend, name, devices, gen):
            super().__init__(backend, name, devices, gen)
            self.wear = DriftAgeing(backend.config.drift_ageing, self, gen)

        def read(self) -> torch.Tensor:
            self.wear.tick()
            return super().read()

        def read_columns(self, cols: slice) -> torch.Tensor:
            self.wear.tick()
            return super().read_columns(cols)

        def _pulse(self, n: torch.Tensor) -> None:
            self.wear.tick()
            super()._pulse(n)
            self.wear.pulsed(n)

        def pulse_columns(self, n: torch.Tensor, cols: slice) -> None:
            Tile.pulse_columns(self, n, cols)  # padded through pulse(): one tick, one booking

        def mvm(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
            self.wear.tick()
            return super().mvm(x, transpose)

        def outer_update(self, x: torch.Tensor, d: torch.Tensor, lr: float) -> None:
            self.backend._check_open("outer_update", self.name)
            x, d = self.check_update(x.to(self.w.device), d.to(self.w.device), lr)
            self.wear.tick()
            bl = self.cfg.train_length
            counts = pulse_train_counts(x, d, lr, self.dw_min, bl, self.gen,
                                        dtype=torch.int8 if bl <= 127 else torch.int32)
            apply_pulse_trains(self.w, counts, self.devices, self.gen, engine=self.cfg.engine)
            self.wear.pulsed(counts.to(torch.int32).abs().sum(0))

        def extra_state(self) -> dict[str, object]:
            return {"drift_ageing": self.wear.state()}

        def load_extra_state(self, state: dict[str, object]) -> None:
            if "drift_ageing" in state:
                self.wear.load(state["drift_ageing"])

    DriftingTile.__name__ = DriftingTile.__qualname__ = f"Drifting{base.__name__}"
    return DriftingTile
