"""URL parameters shared by visa:// and serial://: profile, calibration map and retry policy."""

from __future__ import annotations

from dataclasses import dataclass

from drivers.profile import Profile, load_profile
from drivers.weight_map import WeightMap
from hil.url import BackendURL


@dataclass(frozen=True)
class DriverOptions:
    profile: Profile
    weight_map: WeightMap | None
    timeout_s: float
    retries: int
    backoff_s: float
    take_over: bool  # take the chip from the host that holds it (that host's next call fails)

    @classmethod
    def from_url(cls, url: BackendURL, default_timeout_s: float = 10.0) -> DriverOptions:
        profile = load_profile(url.get_str("profile", "virtual") or "virtual")
        calib = url.get_str("calib")
        return cls(
            profile=profile,
            weight_map=WeightMap.load(calib) if calib else None,
            timeout_s=url.get_float("timeout", default_timeout_s, lo=0.001, hi=600.0),
            retries=url.get_int("retries", 4, lo=0, hi=100),
            backoff_s=url.get_float("backoff", 0.02, lo=0.0, hi=60.0),
            take_over=bool(url.get_int("take_over", 0, lo=0, hi=1)),
        )
