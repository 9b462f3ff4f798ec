"""analog-hil: hardware-in-the-loop training on resistive crossbar arrays.

The core: the backend contract (open a backend by URL, tiles with read and
pulse), response functions, write-verify programming, training algorithms and
analog layers. Backends live in sibling packages and register by URL scheme.
"""

from hil.backend import Backend, Capabilities, Tile, open_backend, register_backend
from hil.errors import (
    BackendError,
    BackendURLError,
    ConfigError,
    HilError,
    InstrumentTimeout,
    ProtocolError,
    SafetyLimitError,
    UnsupportedOperation,
)
from hil.program import ProgramResult, program

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "BackendURLError",
    "Capabilities",
    "ConfigError",
    "HilError",
    "InstrumentTimeout",
    "ProgramResult",
    "ProtocolError",
    "SafetyLimitError",
    "Tile",
    "UnsupportedOperation",
    "__version__",
    "open_backend",
    "program",
    "register_backend",
]
