"""The vectorized torch emulator of a crossbar, registered as the ``sim://`` backend."""

from hil.errors import BackendURLError
from hil.url import BackendURL
from sim_backend.config import SimConfig
from sim_backend.devices import DeviceArray, sample_devices
from sim_backend.emulator import (
    SimBackend,
    SimTile,
    apply_pulse_trains,
    apply_pulses,
    pulse_train_counts,
)


def _sim_config(url: BackendURL) -> SimConfig:
    if url.location:
        raise BackendURLError(f"backend URL {url.url!r}: sim:// takes no location, got "
                              f"{url.location!r} (parameters go after '?')")
    return SimConfig.from_url(url)


def open_sim(url: BackendURL) -> SimBackend:
    """Factory behind ``sim://?model=...&tau=...``: parse the settings, build the backend."""
    return SimBackend(url.url, _sim_config(url))


open_sim.check = _sim_config  # hil.backend.check_backend_url: the parameters, nothing built


__all__ = ["DeviceArray", "SimBackend", "SimConfig", "SimTile", "apply_pulse_trains",
           "apply_pulses", "open_sim",
           "pulse_train_counts", "sample_devices"]
