"""``serial://PORT?baud=...``: an MCU test board speaking the framed protocol through pyserial
(device paths, ptys, or pyserial URLs such as socket://host:port)."""

from __future__ import annotations

from drivers.chip_backend import ChipBackend
from drivers.frames import FrameLink
from drivers.transport import SerialTransport
from drivers.url_options import DriverOptions
from hil.errors import BackendURLError
from hil.url import BackendURL


def open_serial(url: BackendURL) -> ChipBackend:
    """Parse every parameter first (unknown ones fail before a byte is sent), then connect."""
    baud = url.get_int("baud", 115200, lo=300, hi=100_000_000)
    opts = DriverOptions.from_url(url)
    url.finish()
    if not url.location:
        raise BackendURLError(f"backend URL {url.url!r}: give a port, e.g. "
                              "serial:///dev/ttyUSB0 or serial://socket://127.0.0.1:5025")
    transport = SerialTransport(url.location, baud, opts.timeout_s)
    return ChipBackend(url.url, FrameLink(transport), opts.profile, opts.weight_map,
                       opts.retries, opts.backoff_s, take_over=opts.take_over)
