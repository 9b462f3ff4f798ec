"""Backend URL parsing: scheme, location and typed query parameters with strict checking."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from hil.errors import BackendURLError


@dataclass
class BackendURL:
    """A parsed backend URL such as ``sim://?model=power&tau=0.6``.

    Parameters are consumed with the typed getters; :meth:`finish` rejects any
    parameter nobody asked for, so a typo never passes silently.
    """

    url: str
    scheme: str
    location: str
    params: dict[str, str]
    _used: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, url: str) -> BackendURL:
        if not isinstance(url, str) or "://" not in url:
            raise BackendURLError(f"backend URL {url!r} has no scheme (expected e.g. 'sim://')")
        scheme, rest = url.split("://", 1)
        if not scheme.isidentifier():
            raise BackendURLError(f"backend URL {url!r}: bad scheme {scheme!r}")
        location, _, query = rest.partition("?")
        params: dict[str, str] = {}
        for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
            if key in params:
                raise BackendURLError(f"backend URL {url!r}: parameter {key!r} given twice")
            params[key] = value
        if query and not params:
            raise BackendURLError(f"backend URL {url!r}: cannot parse query {query!r}")
        return cls(url=url, scheme=scheme.lower(), location=location, params=params)

    def _raw(self, key: str) -> str | None:
        self._used.add(key)
        return self.params.get(key)

    def has(self, key: str) -> bool:
        return key in self.params

    def get_str(
        self, key: str, default: str | None = None, choices: tuple[str, ...] = ()
    ) -> str | None:
        raw = self._raw(key)
        if raw is None:
            return default
        if choices and raw not in choices:
            raise BackendURLError(
                f"backend URL {self.url!r}: parameter {key}={raw!r} "
                f"must be one of {', '.join(choices)}"
            )
        return raw

    def get_float(
        self, key: str, default: float | None = None, *, lo: float | None = None,
        hi: float | None = None, allow_inf: bool = False,
    ) -> float | None:
        """A float parameter within [lo, hi]; NaN is always refused, +-inf unless
        ``allow_inf`` (no shipped parameter means anything by an infinite value)."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise BackendURLError(
                f"backend URL {self.url!r}: parameter {key}={raw!r} is not a number"
            ) from None
        if not allow_inf and not math.isfinite(value):
            raise BackendURLError(
                f"backend URL {self.url!r}: parameter {key}={raw!r} must be a finite number"
            )
        if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise BackendURLError(
                f"backend URL {self.url!r}: parameter {key}={raw!r} is outside {rng}"
            )
        return value

    def get_int(
        self, key: str, default: int | None = None, *, lo: int | None = None,
        hi: int | None = None,
    ) -> int | None:
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise BackendURLError(
                f"backend URL {self.url!r}: parameter {key}={raw!r} is not an integer"
            ) from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise BackendURLError(
                f"backend URL {self.url!r}: parameter {key}={raw!r} is outside [{lo}, {hi}]"
            )
        return value

    def finish(self) -> None:
        """Raise if the URL carries a parameter that no getter consumed."""
        unknown = sorted(set(self.params) - self._used)
        if unknown:
            raise BackendURLError(
                f"backend URL {self.url!r}: unknown parameter(s) {', '.join(unknown)}"
            )


def with_param(url: str, key: str, value: str) -> str:
    """``url`` with one more query parameter (e.g. take_over=1 for a chip URL)."""
    return f"{url}{'&' if '?' in url else '?'}{key}={value}"
