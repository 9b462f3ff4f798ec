"""``station://PROFILE`` (real instruments over VISA) and ``station://PROFILE?sim=URL`` (the
same driver against simulated instruments in-process, driven by the backend at URL)."""

from __future__ import annotations

from drivers.station.backend import StationBackend, station_interlock
from drivers.station.dialect import (
    Connection,
    LocalConnection,
    NodeConnection,
    VisaConnection,
)
from drivers.station.profile import StationProfile, load_station_profile
from drivers.weight_map import WeightMap
from hil.errors import BackendURLError
from hil.url import BackendURL


def dialect_class(profile: StationProfile):
    if profile.dialect == "keysight":
        from drivers.station.keysight import KeysightDialect

        return KeysightDialect
    from drivers.station.keithley import KeithleyDialect

    return KeithleyDialect


MAX_FRAMES = 8  # the first matrix frame and up to 7 expansion frames (profile.py)
STATION_KEYS = ("timeout", "library", "calib", "smu", "matrix", "take_over",
                *(f"matrix{k}" for k in range(2, MAX_FRAMES + 1)))


def _sim_url(url: BackendURL) -> str | None:
    """The simulated chip's URL of ``sim=``: its value plus the parameters after it that are
    not the station's own (so ``station://P?sim=sim://?model=power&seed=1`` needs no
    escaping, and a parameter appended later, such as take_over=1, stays the station's)."""
    if "sim" not in url.params:
        return None
    keys = list(url.params)
    inner = url.get_str("sim") or "sim://"
    extra = [f"{k}={url.params[k]}" for k in keys[keys.index("sim") + 1:]
             if k not in STATION_KEYS]
    for pair in extra:
        url._raw(pair.split("=", 1)[0])
    if extra:
        inner += ("&" if "?" in inner else "?") + "&".join(extra)
    return inner


def open_station(url: BackendURL) -> StationBackend:
    """Every parameter and every limit is checked before a connection is opened."""
    raw = url.url
    sim_url = _sim_url(url)
    if not url.location:
        raise BackendURLError(f"backend URL {raw!r}: give a station profile, e.g. "
                              "station://keysight-b2900-b2200")
    profile = load_station_profile(url.location)
    timeout = url.get_float("timeout", 10.0, lo=0.001, hi=600.0)
    library = url.get_str("library", "@py") or "@py"
    calib = url.get_str("calib") or profile.conductance.calib
    take_over = bool(url.get_int("take_over", 0, lo=0, hi=1))
    smu = url.get_str("smu")  # VISA resources overriding the profile's (e.g. a served sim)
    matrix = url.get_str("matrix")
    frames = [url.get_str(f"matrix{k + 2}") for k in range(len(profile.matrix.expansion))]
    if smu or matrix or any(frames):
        expansion = [f.model_copy(update={"resource": r or f.resource})
                     for f, r in zip(profile.matrix.expansion, frames, strict=True)]
        profile = profile.model_copy(update={
            "smu": profile.smu.model_copy(update={"resource": smu or profile.smu.resource}),
            "matrix": profile.matrix.model_copy(
                update={"resource": matrix or profile.matrix.resource,
                        "expansion": expansion})})
    url.finish()
    station_interlock(profile)  # refuse a bad profile before any byte
    weight_map = WeightMap.load(calib) if calib else None
    if take_over:
        raise BackendURLError(f"backend URL {raw!r}: a station's instruments are held by VISA "
                              "exclusive locks, which no other host can take over: close the "
                              "session that holds them")
    return connect(raw, profile, sim_url, weight_map, timeout, library)


def connect(url: str, profile: StationProfile, sim_url: str | None = None,
            weight_map: WeightMap | None = None, timeout_s: float = 10.0,
            library: str = "@py") -> StationBackend:
    """The backend on real instruments (``sim_url`` None) or on a simulated station."""
    chip = None
    expansion: list[Connection] = []
    if sim_url is not None:
        from drivers.station.sim.station import SimStation

        sim = SimStation(profile, sim_url)
        chip = sim.chip
        smu: Connection = LocalConnection(sim.server("smu"), "sim-smu")
        sim.chip.station = sim
        if profile.tsplink_nodes is None:
            matrix: Connection = LocalConnection(sim.server("matrix"), "sim-matrix")
            expansion = [LocalConnection(sim.server(name), f"sim-{name}")
                         for name in sim.instruments[2:]]
    else:
        smu = VisaConnection(profile.smu.resource, timeout_s, library)
        opened: list[Connection] = [smu]
        try:
            if profile.tsplink_nodes is None:
                matrix = VisaConnection(profile.matrix.resource, timeout_s, library)
                opened.append(matrix)
                for frame in profile.matrix.expansion:
                    expansion.append(VisaConnection(frame.resource, timeout_s, library))
        except BaseException:
            for conn in opened + expansion:
                conn.close()
            raise
    if profile.tsplink_nodes is not None:  # the matrices behind the SMU, on TSP-Link
        matrix, *expansion = [NodeConnection(smu, node) for node in profile.tsplink_nodes]
    try:
        dialect = dialect_class(profile)(profile, smu, matrix, expansion)
    except BaseException:
        for conn in (smu, matrix, *expansion):
            conn.close()
        if chip is not None:
            chip.close()
        raise
    try:
        return StationBackend(url, profile, dialect, weight_map, chip)
    except BaseException:
        if chip is not None:
            chip.close()
        raise
