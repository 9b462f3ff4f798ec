"""Channel mappings: which ArC TWO channel drives each wordline and bitline of the array in
the socket (arc2control's TOML layout: ``[config] words, bits``, ``[mapping] words, bits``,
optional ``[config] mask`` of usable ``[word, bit]`` crosspoints)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivers.arc2.spec import BIT_CHANNELS, WORD_CHANNELS
from hil.errors import ConfigError

MAPPING_DIR = Path(__file__).with_name("mappings")
DEFAULT_MAPPING = "standard32"


@dataclass(frozen=True)
class ChannelMap:
    """Wordline i is wired to channel ``words[i]``, bitline j to ``bits[j]``; a device
    (i, j) is pulsed and read with its bitline as the low channel, its wordline as high."""

    name: str
    words: tuple[int, ...]
    bits: tuple[int, ...]
    usable: np.ndarray  # bool [words, bits]: crosspoints that may be used

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.words), len(self.bits)

    def word_positions(self, words: tuple[int, ...] | list[int]) -> np.ndarray:
        """Index of each given wordline's channel in a slice result (WORD_CHANNELS order)."""
        return np.array([WORD_CHANNELS.index(self.words[i]) for i in words], dtype=np.intp)

    def bit_positions(self, bits: tuple[int, ...] | list[int]) -> np.ndarray:
        """Index of each given bitline's channel in read_all's rows (BIT_CHANNELS order)."""
        return np.array([BIT_CHANNELS.index(self.bits[j]) for j in bits], dtype=np.intp)

    def line_of_channel(self) -> tuple[dict[int, int], dict[int, int]]:
        """{channel: wordline}, {channel: bitline}."""
        return ({c: i for i, c in enumerate(self.words)}, {c: j for j, c in enumerate(self.bits)})


def mapping_path(name_or_path: str) -> Path:
    """A bare name means drivers/arc2/mappings/NAME.toml; anything else is a file path."""
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        return MAPPING_DIR / f"{name_or_path}.toml"
    return Path(name_or_path)


def load_mapping(name_or_path: str = DEFAULT_MAPPING) -> ChannelMap:
    """Read and check a mapping file; ConfigError names the file and the field."""
    path = mapping_path(name_or_path)
    where = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(sorted(p.stem for p in MAPPING_DIR.glob("*.toml")))
        raise ConfigError(where, "mapping", f"no such mapping file (shipped: {known})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(where, "toml", str(exc)) from None
    config, mapping = raw.get("config"), raw.get("mapping")
    if not isinstance(config, dict) or not isinstance(mapping, dict):
        raise ConfigError(where, "<top>", "needs [config] and [mapping] tables")
    lines = {}
    for key, allowed in (("words", WORD_CHANNELS), ("bits", BIT_CHANNELS)):
        count, chans = config.get(key), mapping.get(key)
        if not isinstance(count, int) or not 1 <= count <= 32:
            raise ConfigError(where, f"config.{key}", "must be an integer in 1..32")
        if (not isinstance(chans, list) or len(chans) < count
                or not all(isinstance(c, int) and not isinstance(c, bool) for c in chans)):
            raise ConfigError(where, f"mapping.{key}",
                              f"must list at least {count} integer channels")
        chans = chans[:count]
        bad = [c for c in chans if c not in allowed]
        if bad:
            raise ConfigError(where, f"mapping.{key}",
                              f"channels {bad} are not {key[:-1]}line channels of the "
                              f"32x32 layout ({allowed[0]}..{allowed[15]}, "
                              f"{allowed[16]}..{allowed[31]})")
        if len(set(chans)) != len(chans):
            raise ConfigError(where, f"mapping.{key}", "a channel is listed twice")
        lines[key] = tuple(chans)
    shape = (len(lines["words"]), len(lines["bits"]))
    usable = np.ones(shape, dtype=bool)
    if "mask" in config:
        usable[:] = False
        try:
            for w, b in config["mask"]:
                if not (0 <= int(w) < shape[0] and 0 <= int(b) < shape[1]):
                    raise IndexError(w, b)
                usable[int(w), int(b)] = True
        except (TypeError, ValueError, IndexError):
            raise ConfigError(where, "config.mask",
                              f"must be a list of [word, bit] pairs within {shape}") from None
    name = str(config.get("name", path.stem))
    return ChannelMap(name=name, words=lines["words"], bits=lines["bits"], usable=usable)
