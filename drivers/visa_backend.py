"""``visa://RESOURCE?profile=...``: a crossbar test chip speaking SCPI through pyvisa-py
(TCPIP SOCKET, USB, GPIB, ASRL resources)."""

from __future__ import annotations

from drivers.chip_backend import ChipBackend
from drivers.scpi import ScpiLink
from drivers.transport import VisaTransport
from drivers.url_options import DriverOptions
from hil.errors import BackendURLError
from hil.url import BackendURL


def open_visa(url: BackendURL) -> ChipBackend:
    """Parse every parameter first (unknown ones fail before a byte is sent), then connect."""
    library = url.get_str("library", "@py") or "@py"  # '@py': pyvisa-py; '@ivi': a vendor VISA
    opts = DriverOptions.from_url(url)
    url.finish()
    if not url.location:
        raise BackendURLError(f"backend URL {url.url!r}: give a VISA resource, e.g. "
                              "visa://TCPIP0::127.0.0.1::5025::SOCKET")
    transport = VisaTransport(url.location, opts.timeout_s, library)
    return ChipBackend(url.url, ScpiLink(transport), opts.profile, opts.weight_map,
                       opts.retries, opts.backoff_s, take_over=opts.take_over)
